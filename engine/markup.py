"""HTML and XML in, translatable runs out, and back: a small document tree built from the standard library's
parsers (html.parser for HTML, expat for XML, which reports where malformed XML breaks).

A *run* is a stretch of inline content between block boundaries: its text is translated as sentences, and its
inline elements (b, i, a, span, ...) become character spans of that text, put back around the target words they
align to (service of engine/rich_text.py). What must not be translated is copied verbatim: block elements pre,
script, style, textarea; inline code, kbd, samp, var; any element with translate="no" or class "notranslate"; and
void elements (img, input) inside a run are kept as protected spans. Block boundaries (p, li, td, h1-h6, div, br,
...) split runs, so each block is its own segment. Attributes are kept; the character references of the input
(&nbsp;, &#169;, ...) come back in the same form, unless the text also writes that character as itself.
"""

from __future__ import annotations

import dataclasses
import html
import html.parser
import re
import xml.parsers.expat

from engine.errors import InvalidRequestError

# HTML elements that are inline (phrasing content) and whose text is translated.
INLINE = frozenset("a abbr b bdi bdo cite data dfn em font i ins del label mark q s small span strong sub sup "
                   "time u big tt".split())
# Inline elements copied verbatim (code and what a program prints or reads).
INLINE_VERBATIM = frozenset("code kbd samp var".split())
# Block elements copied verbatim.
BLOCK_VERBATIM = frozenset("pre script style textarea template".split())
VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
# Deeper markup is refused (422): the tree is walked recursively, and no real document nests this deep.
MAX_DEPTH = 200
# Void elements that split a run (the rest, img, input..., stay in it as protected spans).
BREAKING_VOID = frozenset("br hr area base col link meta param source track".split())
# Elements whose content is raw text in HTML (html.parser passes it undecoded): written back byte for byte.
RAW_TEXT = frozenset(("script", "style"))
# HTML's optional end tags (WHATWG HTML, 13.1.2.4 "Optional tags"): a start tag closes the open element it implies
# the end of, searching the open elements down to the first of ``scope``: start tag -> (names it closes, scope).
_IMPLIED_END = {
    "li": ({"li"}, {"ul", "ol", "menu"}),
    "dt": ({"dt", "dd"}, {"dl"}), "dd": ({"dt", "dd"}, {"dl"}),
    "td": ({"td", "th"}, {"tr", "table"}), "th": ({"td", "th"}, {"tr", "table"}),
    "tr": ({"tr"}, {"table", "tbody", "thead", "tfoot"}),
    "tbody": ({"tbody", "thead", "tfoot"}, {"table"}), "thead": ({"tbody", "thead", "tfoot"}, {"table"}),
    "tfoot": ({"tbody", "thead", "tfoot"}, {"table"}),
    "option": ({"option"}, {"select", "datalist", "optgroup"}), "optgroup": ({"optgroup"}, {"select"}),
}
# Start tags that close an open p (13.1.2.4), unless a scope boundary lies between.
_CLOSES_P = frozenset("address article aside blockquote details dialog div dl fieldset figcaption figure footer form "
                      "h1 h2 h3 h4 h5 h6 header hgroup hr main menu nav ol p pre section table ul".split())
_P_SCOPE = frozenset("applet button caption html marquee object table td th template".split())
_OPTIONAL_END = frozenset(_IMPLIED_END) | {"p"}


@dataclasses.dataclass
class Element:
    name: str
    start_tag: str  # as written (HTML) or rebuilt with its attributes (XML)
    end_tag: str  # "" for void elements and self-closing XML tags
    children: list = dataclasses.field(default_factory=list)  # Element | Text | Raw
    verbatim: bool = False
    inline: bool = False


@dataclasses.dataclass
class Text:
    text: str  # decoded (entities resolved)


@dataclasses.dataclass
class Raw:
    markup: str  # copied as is: comments, doctype, processing instructions, CDATA


def _no_translate(attrs: list[tuple[str, str | None]]) -> bool:
    for key, value in attrs:
        if key == "translate" and (value or "").lower() == "no":
            return True
        if key == "class" and "notranslate" in (value or "").split():
            return True
    return False


_REFERENCE = re.compile(r"&(#\d+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")


class _HtmlBuilder(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", "", "")
        self.stack = [self.root]
        self.references: dict[str, str] = {}  # decoded character -> the reference the input wrote for it

    def handle_starttag(self, tag, attrs):
        raw = self.get_starttag_text() or f"<{tag}>"
        self._close_implied(tag)
        parent = self.stack[-1]
        verbatim = parent.verbatim or tag in BLOCK_VERBATIM or tag in INLINE_VERBATIM or _no_translate(attrs)
        element = Element(tag, raw, "" if tag in VOID else f"</{tag}>", verbatim=verbatim,
                          inline=tag in INLINE or tag in INLINE_VERBATIM or (tag in VOID and tag not in BREAKING_VOID))
        parent.children.append(element)
        if tag not in VOID:
            self.stack.append(element)
            _check_depth(len(self.stack) - 1)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:  # <em/>: an empty element, written back as it came
            self.stack.pop().end_tag = ""

    def _close_implied(self, tag: str) -> None:
        """Closes the open element whose end ``tag``'s start implies (<li> after an unclosed <li>, a block after an
        unclosed <p>), so that such lists and tables are siblings, not nested ever deeper."""
        names, scope = _IMPLIED_END.get(tag, ({"p"}, _P_SCOPE) if tag in _CLOSES_P else (None, None))
        if names is None:
            return
        for i in range(len(self.stack) - 1, 0, -1):
            name = self.stack[i].name
            if name in names:
                self._pop_to(i)
                return
            if name in scope:
                return

    def _pop_to(self, i: int, closed_by_tag: bool = False) -> None:
        """Closes stack[i:]. An element of an optional end tag that the input did not close is written back
        without one, as it came; others left open inside keep theirs (the output stays well-formed)."""
        for k, element in enumerate(self.stack[i:]):
            if element.name in _OPTIONAL_END and not (closed_by_tag and k == 0):
                element.end_tag = ""
        del self.stack[i:]

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].name == tag:
                self._pop_to(i, closed_by_tag=True)  # closes what was left open inside it (as browsers do)
                return
        # A stray end tag: dropped, so that the output stays well-formed; but "</br>", which browsers take for a
        # line break (sloppy pages have it), is kept as a line break is.
        if tag == "br":
            self.stack[-1].children.append(Raw("</br>"))

    def parse_bogus_comment(self, i, report=1):
        """"<!" or "</" not followed by a comment, declaration or tag ("<! note>", "</ x>"): a comment up to the next
        ">" for browsers, kept as it came (html.parser's handle_comment would write it back as "<!-- note-->")."""
        end = self.rawdata.find(">", i + 2)
        if end == -1:
            return -1
        if report:
            self.stack[-1].children.append(Raw(self.rawdata[i:end + 1]))
        return end + 1

    def handle_data(self, data):
        top = self.stack[-1]
        top.children.append(Raw(data) if top.name in RAW_TEXT else Text(data))

    def handle_comment(self, data):
        self.stack[-1].children.append(Raw(f"<!--{data}-->"))

    def handle_decl(self, decl):
        self.stack[-1].children.append(Raw(f"<!{decl}>"))

    def handle_pi(self, data):
        self.stack[-1].children.append(Raw(f"<?{data}>"))

    def unknown_decl(self, data):  # html.parser hands "<![CDATA[x]]>" over as "CDATA[x"
        self.stack[-1].children.append(Raw(f"<![{data}]]>" if data.startswith("CDATA[") else f"<![{data}]>"))

    def feed_source(self, source: str) -> None:
        # A character the text also writes as itself comes back as itself: one "&#10;" in an attribute turned every
        # newline of the page into "&#10;", and the references' positions are not tracked through translation.
        literal = set(_REFERENCE.sub("", source))
        for m in _REFERENCE.finditer(source):
            char = html.unescape(m.group())
            if (len(char) == 1 and char not in "&<>\"'" and (ord(char) > 127 or not char.isprintable())
                    and char not in literal):
                self.references.setdefault(char, m.group())
        self.feed(source)
        if self.cdata_elem is not None and self.rawdata:
            # A <script> or <style> with no end tag: html.parser holds its content back and close() dropped it.
            # It runs to the end of the document, as in browsers; written back as it came, with no end tag added.
            self.handle_data(self.rawdata)
            self.stack[-1].end_tag = ""
            self.rawdata = ""
        elif self.rawdata.startswith(("<!", "<?")):
            # An unterminated comment, declaration or processing instruction runs to the end of the document, as in
            # browsers (HTML's eof-in-comment): written back as it came, never translated (html.parser would hand
            # it over as text, which came back as "&lt;!-- ..." with the rest of the document translated).
            self.stack[-1].children.append(Raw(self.rawdata))
            self.rawdata = ""
        self.close()
        self._pop_to(1)  # what is still open at the end closes with the document


def parse_html(source: str) -> tuple[Element, dict[str, str]]:
    """The document tree of ``source`` (lenient, as browsers are: unclosed elements close with their parent, stray
    end tags are dropped) and the character references it used."""
    builder = _HtmlBuilder()
    builder.feed_source(source)
    return builder.root, builder.references


FRAGMENT_ROOT = "_nmt_fragment"  # the root a fragment is parsed in (not counted in its depth), made longer when the
# text holds that name: a stray end tag of it in the text would otherwise close the root and get expat's error about
# the root's end instead of its own


def parse_xml(source: str, fragment: bool = False) -> tuple[Element, dict[str, str]]:
    """The document tree of ``source``, a document or a fragment (text and elements side by side, as in "Press
    <b>Ctrl+S</b>."); an element is inline when its parent holds text of its own. ``fragment``: the wrapped second
    attempt (internal; raises ExpatError).

    Raises:
        InvalidRequestError: malformed XML, with the line and column where it breaks (the text's own).
    """
    root = Element("#document", "", "")
    stack = [root]
    in_cdata = [False]
    parser = xml.parsers.expat.ParserCreate()
    parser.ordered_attributes = True

    def start(name, attrs):
        pairs = list(zip(attrs[::2], attrs[1::2]))
        tag = "<" + name + "".join(f" {k}={_quote(v)}" for k, v in pairs) + ">"
        element = Element(name, tag, f"</{name}>", verbatim=stack[-1].verbatim or _no_translate(pairs))
        stack[-1].children.append(element)
        stack.append(element)
        _check_depth(len(stack) - 1 - fragment)

    def end(name):
        element = stack.pop()
        if not element.children:  # <x/> or <x></x>: written back self-closed
            element.start_tag, element.end_tag = element.start_tag[:-1] + "/>", ""

    def data(text):
        stack[-1].children.append(Raw(text) if in_cdata[0] else Text(text))  # CDATA content stays as written

    def default(markup):
        stack[-1].children.append(Raw(markup))

    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.CharacterDataHandler, parser.DefaultHandler = data, default
    def cdata(opening: bool) -> None:
        in_cdata[0] = opening
        stack[-1].children.append(Raw("<![CDATA[" if opening else "]]>"))

    parser.StartCdataSectionHandler = lambda: cdata(True)
    parser.EndCdataSectionHandler = lambda: cdata(False)
    try:
        parser.Parse(source, True)
    except xml.parsers.expat.ExpatError as e:
        if fragment:
            raise
        # Not one document: text around elements, or several top-level elements ("Press <b>Ctrl+S</b> to
        # save."), as DeepL takes. Parsed inside a root of its own, whose content is the text's.
        name = FRAGMENT_ROOT
        while name in source:
            name += "_"
        opening = f"<{name}>"
        try:
            wrapper = parse_xml(f"{opening}{source}</{name}>", fragment=True)[0].children[0]
        except xml.parsers.expat.ExpatError as inner:
            if not source.lstrip().startswith("<?xml"):  # a fragment's own error, at the text's own column
                e = inner
                e.offset -= len(opening) if e.lineno == 1 else 0
                lines = source.split("\n")
                if e.lineno > len(lines) or (e.lineno == len(lines) and e.offset >= len(lines[-1])):
                    # At the root this service wrapped the text in: an element the text left open (expat says
                    # "mismatched tag", at a column past the text's end).
                    raise InvalidRequestError(f"malformed XML: an element is not closed by the end of the text "
                                              f"(line {len(lines)}, column {len(lines[-1]) + 1})") from None
            raise InvalidRequestError(f"malformed XML at line {e.lineno}, column {e.offset + 1}: "
                                      f"{xml.parsers.expat.ErrorString(e.code)}") from None
        root.children = wrapper.children
    _mark_inline(root)
    return root, {}


def _check_depth(depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidRequestError(f"markup nested {depth} elements deep > limit {MAX_DEPTH}")


def _quote(value: str) -> str:
    """An XML attribute value in double quotes. Tab, newline and carriage return are written as references: a parser
    turns them into spaces where they stand literally (XML 1.0 section 3.3.3), so "&#10;" written back as a newline
    would have become a space in the client's parser."""
    escaped = html.escape(value, quote=True).replace("&#x27;", "'")
    return '"' + escaped.replace("\t", "&#9;").replace("\n", "&#10;").replace("\r", "&#13;") + '"'


def _mark_inline(element: Element) -> None:
    has_text = any(isinstance(c, Text) and c.text.strip() for c in element.children)
    for child in element.children:
        if isinstance(child, Element):
            child.inline = has_text or child.inline
            _mark_inline(child)


def escape_text(text: str, references: dict[str, str]) -> str:
    """Text content as markup: &, < and > escaped, and each character the input wrote as a reference written the
    same way again."""
    out = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char, reference in references.items():
        out = out.replace(char, reference)
    return out


def serialize(node, references: dict[str, str]) -> str:
    """The markup of a (sub)tree, unchanged."""
    if isinstance(node, Text):
        return escape_text(node.text, references)
    if isinstance(node, Raw):
        return node.markup
    return node.start_tag + "".join(serialize(c, references) for c in node.children) + node.end_tag
