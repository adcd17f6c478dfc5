"""The engine core: iteration-level (continuous) batching of encoder-decoder search. No Ray, no HTTP, no threads.

    core = EngineCore(model, bos_id=..., eos_id=..., pad_id=..., max_positions=..., config=EngineConfig())
    handle = core.submit(src_ids, DecodingOptions(beam_size=4))
    while core.has_work:
        for done in core.step():
            print(done.handle, done.hypotheses)

Sentences join a running decode between any two decoder steps and leave it as soon as they finish (Orca, OSDI 2022;
for beam search, Yang et al. EMNLP 2020, "A Streaming Approach For Efficient Batched Beam Search"). Each sentence
carries its own state and options (engine/search.py), so a greedy sentence, a beam-4 one, a beam-16 one and a
sampled one can share a step. Rows of one batch that joined at different steps share its self-attention cache, a
preallocated buffer [rows, n_heads, capacity, d_head] in which each row's keys/values start at position 0 and the
step writes the next one at the row's own position, in place (engine/contract.py, format 5). A sentence's rows may
be anywhere in the buffer (``_Sentence.rows``), so that between steps as little as possible is copied: a joiner
takes a spare row (its cache starts empty: nothing to copy) and its cross K/V a spare slot; after a beam step the
first beam of each parent stays in the parent's row and only the other beams are copied, into rows of beams that
ended; when sentences leave, rows past the new count move down into the holes; and each copy takes only the
positions its sentence has cached (``_relayout``). Buffers grow and shrink by doubling and halving their rows; in
positions they hold all the model's from the start when the step reads none past a row's length (memory supplied
as positions are written: ``_positions``), else they double too; an ended batch's buffers serve the next new one.
Before this (2026-12-04), every join copied the whole cache into a bigger one and every reorder gathered every row
at the oldest row's capacity: with 64 one-sentence clients at beam 4, engine alone, one continuous batch spent 3.2
of 9.9 s in those copies and ran at 0.83x static's sentences/s; now 0.65 of 7.0 s, 1.07-1.11x static
(docs/performance.md, Continuous batching). Ops that cannot write in place (OrtValueOps: the cache on a device)
copy into exact-size buffers, as before. Cross-attention K/V are kept once per sentence (not per beam: format 4),
padded to the batch's longest source, with the source mask; beams that reorder leave them as they are.

Scheduling policy, decided at the start of every step:
1. Aborted sentences leave before the step computes them; their results are reported as aborted.
2. Waiting sentences join while the running batches have room. A sentence reserves its most rows (beam_size) against
   ``max_batch_rows`` and its source against ``max_batch_tokens`` (live sentences x longest live source: the padded
   cross-attention memory, as the encoder's chunks were bounded before). Which sentence joins next: the first
   waiting one of a small request (at most SMALL_REQUEST sentences), all of whose sentences join together, the
   rest of one that has started before any that has not (bulk requests that had not started, with deadlines
   earlier than a probe's, filled the overdraw below and held 1-sentence probes for up to 10 s, 2026-12-06; a probe
   that pysbd split in two waited 6-11 s for its second sentence, which queued as a running request's, until a
   quarter of the budget was free; and at saturation, 64 one-sentence clients, such a second sentence waited 2-6
   s behind new one-sentence requests until the queue emptied); then the first of a
   larger group (a request) none of whose sentences has joined yet, so that a request starts at the next step
   whatever else is queued; then that of the group with the earliest deadline (the service
   gives each request request_timeout_s plus a time per sentence, so a large request's is later and it fills only
   what the others leave); then the group that holds the fewest rows now, ties to the group that arrived first.
   Earliest deadline first, not fewest rows, among running requests: sharing rows evenly among many bulk requests
   kept every one of them partly done until all finished at about the same time, past their deadlines (a burst of 200
   60-sentence requests over HTTP ended 126 in 504, 2026-12-06); in deadline order they finish one after another.
   When that sentence does not fit, joining stops for this step (a smaller one does not overtake it, so a long
   sentence is never starved); an empty batch always takes one, and a group with nothing running may overdraw a
   full budget by one sentence, a small request by all of its sentences (up to twice the budget), so a short
   request starts, and finishes, as if alone even while a large one fills the batch. The joiners are encoded in
   one encoder call, so joins are batched where that costs no latency: the remaining sentences of a larger request
   that is already running refill the batch only once a quarter of a budget is free (a rule from when each join
   also copied the whole cache; not re-measured since joins stopped copying).
   Policy "static" (the former behaviour) lets sentences join only an empty batch: each batch then decodes to
   completion before the next forms. The service keeps it to measure against.
   Policy "refill" lets them join only a batch that has drained to its tail: at most 1/REFILL_FRACTION (1/8) of
   the most rows it held since sentences last joined it. One caller's offline list (engine/translator.py,
   translate_ids) decodes so by default: its sentences, submitted shortest first, form static-like batches, but
   the last few sentences of a batch, which would otherwise run tens of steps of 1-4 rows each (a step's fixed
   cost, about 1 ms on the CPU here, for a fraction of its work), decode in the next batch's steps. Their sources
   are no longer than the joiners', so the batch's cross-attention width does not grow for them. (The continuous
   policy refills much earlier, and its joiners, longer than the running sentences, widen every step.)
3. Joiners go into the youngest running batch of their kind unless its sentences are expected to run more than
   ``outlive_steps`` (OUTLIVE_STEPS, 64) steps longer than the joiners (a sentence's expected length: its
   source's, at least its min_length, at most its length limit); then they start a batch of their own beside it, up
   to ``max_batches`` (2) of their kind, and past that they join the youngest anyway. So a short request that
   arrives while three beam-16 sentences are 40 steps into 200 forced tokens does not pay for their expensive
   steps (engine alone: 0.07 s in a batch of its own, 0.20 s in theirs), while sentences of like lengths, whenever
   they arrive, share one batch and its larger steps (64 one-sentence clients at beam 4, engine alone: 76-77
   sentences/s, against 59-67 when a batch more than 8 steps old took no joiners, the rule before 2026-12-04,
   which kept joiners out of wide caches that each join and reorder then copied whole). The two kinds: sentences
   of small requests (at most SMALL_REQUEST sentences, an interactive user's) and of larger ones (bulk), so that a
   bulk request's sentences, always waiting for room, never fill the batch that a small request decodes in.
4. One decoder step runs over every row of one batch: the batch that has had the least decoder time (a new batch
   starts level with the least of the others). Batches thus share the processor's time equally, as CFS shares it
   between processes: a short request that starts beside long ones runs its cheap steps several times for each of
   their expensive ones instead of waiting on every one of them (a 1-sentence request beside three beam-16
   sentences 40 steps into 200, engine alone: 0.10-0.32 s in their batch, 0.05-0.14 s in its own). The price: a
   batch draining its last few rows gets an equal share too, and steps of few rows use the processor less well
   (docs/performance.md, Continuous batching, gives both sides measured). Each sentence's strategy reads its rows'
   scores and picks its next tokens. A sentence whose scores hold NaN, or whose strategy raises, fails alone; the others
   go on.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable

import numpy as np

from engine.errors import InputTooLongError, NumericalError
from engine.options import DecodingOptions, check_target_lengths
from engine.rules import Rules, Sampling
from engine.candidates import TopCandidates
from engine.search import BeamSearch, GreedySearch, Hypothesis, SentenceSearch, ban
from engine.state_ops import NumpyOps

NO_DEADLINE = float("inf")

log = logging.getLogger(__name__)

POLICIES = ("continuous", "refill", "static")
MAX_BATCHES = 2  # batches decoding side by side (module docstring)
OUTLIVE_STEPS = 64  # a batch expected to outlive its joiners by more steps makes them start a batch of their own
REFILL_FRACTION = 8  # "refill": a batch takes joiners once its rows are at most 1/8 of its peak since the last join
SMALL_REQUEST = 4  # sentences: a request of at most this many decodes in batches apart from larger ones
# Positions added to a batch's cache when a row reaches its end: growing copies the cache, so not every step, and
# a beam reorder copies the unused capacity too, so not far ahead.
CACHE_GROWTH = 8
SPARE_BUFFERS = 2  # self-attention buffer sets of ended batches kept for new batches (in-place ops)
# Padding, in source tokens, that one more encoder call costs about as much as (a call's fixed cost on the CPU):
# joiners are encoded in groups of like lengths so that short sources are not padded to the longest.
ENCODER_CALL_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class Finished:
    """A sentence that left the engine: ``hypotheses`` best first (n_best of them; [] for an empty source or when
    aborted), or the ``error`` that failed it alone; ``queue_seconds`` it waited before joining a decode and
    ``decode_seconds`` it spent in one (time.monotonic(), seconds; 0 if it never joined)."""

    handle: int
    hypotheses: list[Hypothesis]
    error: Exception | None = None
    aborted: bool = False
    queue_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclasses.dataclass
class CoreStats:
    """Counters since the core was made: decoder steps, rows computed (summed over steps), sentences that joined
    the running batch / left it (finished, failed or aborted after joining; left <= joined), generated tokens of
    finished best hypotheses."""

    steps: int = 0
    rows: int = 0
    joined: int = 0
    left: int = 0
    generated_tokens: int = 0


@dataclasses.dataclass(eq=False)
class _Sentence:
    handle: int
    group: object
    src_ids: list[int]
    search: SentenceSearch
    return_attention: bool
    step: int = 0
    aborted: bool = False
    small: bool = False  # of a request of at most SMALL_REQUEST sentences (set when it joins)
    rows: np.ndarray | None = None  # int64 [n_rows]: its rows in its batch's self-attention buffers, beam order
    submitted_at: float = dataclasses.field(default_factory=time.monotonic)
    joined_at: float | None = None


@dataclasses.dataclass(eq=False)
class _Batch:
    """Sentences that decode together in one decoder call per step, with their shared state (shapes in
    engine/contract.py). ``live[i]`` holds slot i of the cross K/V and row i of ``src_mask``; its decoder rows are
    ``live[i].rows`` of the self-attention buffers, anywhere among their first ``rows`` rows. With in-place ops the
    buffers hold spare rows and positions beyond those used (EngineCore._fit)."""

    live: list[_Sentence] = dataclasses.field(default_factory=list)
    self_: list | None = None  # self-attention K then V, per decoder layer: [>= rows, n_heads, capacity, d_head]
    cross: list | None = None  # cross-attention K then V, per layer: [>= sentences, n_heads, src_width, d_head]
    rows: int = 0  # decoder rows in use: 0 .. rows - 1, every one some live sentence's
    src_mask: np.ndarray = dataclasses.field(  # [sentences, src_width], one per live sentence, in order
        default_factory=lambda: np.zeros((0, 0), dtype=bool))
    small: bool = False  # a batch of small requests' sentences (module docstring)
    peak_rows: int = 0  # the most rows in use since sentences last joined (policy "refill")
    seconds: float = 0.0  # decoder time this batch has had (EngineCore.clock), for the choice of the next batch
    views: tuple | None = None  # EngineCore._views: the step's views of the buffers, and what they were made of

    @property
    def width(self) -> int:
        """The age of its oldest live row, in steps (= that row's cached positions)."""
        return max((s.step for s in self.live), default=0)


def _capacity(positions: int) -> int:
    """Cache capacity for ``positions`` cached keys/values plus the one a step writes: a multiple of CACHE_GROWTH."""
    return (positions // CACHE_GROWTH + 1) * CACHE_GROWTH


class EngineCore:
    """Step-able decoding of sentences that join and leave between steps (policy in the module docstring).

    Args:
        model: encode(src_ids, src_mask) -> (cross_k, cross_v); step(tokens, self_k, self_v, cross_k, cross_v,
            src_mask, top_k, positions=, row_sentence= (None: row i is sentence i's), check_nan=False) ->
            (log_probs or TopCandidates, self_k, self_v, attention), writing the caches in place or returning new
            ones; ``ops`` (engine/state_ops.py) for its state tensors; optionally ``top_k(log_probs, k)``,
            ``io_binding`` and ``logits_on_request`` (True: step takes ``log_softmax=False`` and then gives logits;
            engine/runtime.py's OnnxModel has all of these).
        bos_id, eos_id, pad_id: special token ids; pad is never generated (plus ``banned_ids``).
        max_positions: the model's position table; bounds source and target lengths.
        policy: "continuous", "refill" or "static"; max_batch_rows: decoder rows of all batches; max_batch_tokens: live
            sentences x longest live source.
        max_batches: batches of each kind (small requests' and larger ones') that decode side by side under
            "continuous" (module docstring); 1 = one batch, every sentence joins it.
        outlive_steps: how many steps longer than its joiners a batch may be expected to run and still take them
            (module docstring, point 3).
        clock: seconds, for the batches' shares of decoder time (tests pass a scripted one).

    Raises:
        ValueError: an unknown policy or a budget < 1.
    """

    def __init__(self, model, *, bos_id: int, eos_id: int, pad_id: int, max_positions: int,
                 policy: str = "continuous", max_batch_rows: int = 512, max_batch_tokens: int = 1024,
                 banned_ids: tuple[int, ...] | None = None, max_batches: int = MAX_BATCHES,
                 outlive_steps: int = OUTLIVE_STEPS, clock: Callable[[], float] = time.perf_counter) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_batch_rows < 1 or max_batch_tokens < 1 or max_batches < 1:
            raise ValueError(f"max_batch_rows, max_batch_tokens and max_batches must be >= 1, got {max_batch_rows}, "
                             f"{max_batch_tokens}, {max_batches}")
        self.model, self.ops = model, getattr(model, "ops", NumpyOps())
        # Whether grown self-attention caches may be left uninitialized past what is copied (OnnxModel).
        self.cache_tail_unread = bool(getattr(model, "cache_tail_unread", False))
        self.bos_id, self.eos_id, self.pad_id, self.max_positions = bos_id, eos_id, pad_id, max_positions
        self.policy, self.max_batch_rows, self.max_batch_tokens = policy, max_batch_rows, max_batch_tokens
        self.max_batches = max_batches if policy == "continuous" else 1
        self.outlive_steps = outlive_steps
        self.clock = clock
        self.banned_ids = banned_ids if banned_ids is not None else (pad_id,)
        # Top-k where the log-probs are (engine/top_k.py): beam search always gains; greedy search only when the
        # log-probs would otherwise cross from a device (on the CPU an argmax is cheaper than TopK).
        self.has_top_k = hasattr(model, "top_k")
        self.logits_on_request = bool(getattr(model, "logits_on_request", False))
        self.device_top_k = self.has_top_k and bool(getattr(model, "io_binding", False))
        self.stats = CoreStats()
        self._handles = itertools.count()
        self._waiting: dict[object, collections.deque[_Sentence]] = {}  # group -> its sentences, groups by arrival
        self._deadlines: dict[object, float] = {}  # group -> its deadline, while it has sentences waiting
        self._started: set = set()  # groups with sentences waiting of which one has joined
        self._by_handle: dict[int, _Sentence] = {}
        self._done_early: list[Finished] = []  # empty sources and aborted waiting sentences, reported next step
        self._batches: list[_Batch] = []  # oldest first
        self._spare: list[list] = []  # self-attention buffers of ended batches, smallest first (in-place ops)

    # ---- the protocol ------------------------------------------------------------------------------------------

    def submit(self, src_ids: list[int], options: DecodingOptions, *, target_prefix: list[int] | None = None,
               group: object = None, deadline: float | None = None) -> int:
        """Queues one sentence: src_ids (token ids ending in eos; [] = empty input, finishes with no hypothesis and
        no decoding), its options, an optional forced target prefix (token ids, kept in the output), the
        ``group`` (e.g. a request id) that fairness is counted by, and the group's ``deadline`` (time.monotonic()
        seconds; None: none), which orders the groups already running when they join (policy, point 2). Returns
        the sentence's handle.

        Raises:
            InputTooLongError: more source tokens than the model's positions.
            InvalidRequestError: a target_prefix longer than ``max_length`` or the model's positions, or a
                min_length past the model's positions (it could not be met).
        """
        if len(src_ids) > self.max_positions:
            raise InputTooLongError(len(src_ids), self.max_positions)
        check_target_lengths(options, self.max_positions, len(target_prefix or ()))
        handle = next(self._handles)
        if not src_ids:
            self._done_early.append(Finished(handle, []))
            return handle
        sentence = _Sentence(handle, group, list(src_ids), self._search(len(src_ids), options, target_prefix),
                             options.return_attention)
        self._by_handle[handle] = sentence
        self._waiting.setdefault(group, collections.deque()).append(sentence)
        if deadline is not None:
            self._deadlines[group] = min(deadline, self._deadlines.get(group, deadline))
        return handle

    def abort(self, handle: int) -> None:
        """Drops a waiting or running sentence at the next step (reported as aborted then); unknown or finished
        handles are ignored."""
        sentence = self._by_handle.get(handle)
        if sentence is not None:
            sentence.aborted = True

    @property
    def _live(self) -> list[_Sentence]:
        return [s for b in self._batches for s in b.live]

    @property
    def live_rows(self) -> int:
        """Decoder rows of the running batches."""
        return sum(b.rows for b in self._batches)

    @property
    def live_sentences(self) -> int:
        return sum(len(b.live) for b in self._batches)

    @property
    def waiting(self) -> int:
        """Sentences waiting to join (aborted ones excluded)."""
        return sum(not s.aborted for queue in self._waiting.values() for s in queue)

    @property
    def has_work(self) -> bool:
        return bool(self._batches or self._waiting or self._done_early)

    def step(self) -> list[Finished]:
        """Schedules (aborts, joins), runs one decoder step over every row of one batch (the one that has had the
        least decoder time) and returns the sentences that left: finished, failed alone, or aborted. Returns []
        when there is nothing to do.

        Raises:
            Exception: what the model raised for the whole step (e.g. ONNX Runtime failing); every sentence of the
                batch is then failed and reported at the next call, so the core stays usable.
        """
        out, self._done_early = self._done_early, []
        out += self._drop_aborted()
        joining = self._schedule()
        for small in (True, False):
            members = [s for s in joining if s.small == small]
            if not members:
                continue
            batch = self._batch_for_joiners(members, small)
            try:
                self._join(batch, members)
            except Exception as e:  # noqa: BLE001 - the encoder failed for the joiners: fail them, not the batch
                log.exception("encoder failed for %d joining sentences", len(members))
                out += [self._leave(s, error=e) for s in members]
                self._batches = [b for b in self._batches if b.live]
        if not self._batches:
            self._spare.clear()  # idle (joiners would be in a batch now): the kept buffers' memory goes back
            return out
        batch = min(reversed(self._batches), key=lambda b: b.seconds)  # ties: the youngest
        started = self.clock()
        try:
            out += self._decode_step(batch)
        except Exception as e:  # noqa: BLE001 - the whole step failed: fail its sentences, keep the core usable
            log.exception("decoder step failed for %d sentences", len(batch.live))
            out += [self._leave(s, error=e) for s in batch.live]
            batch.live = []
        batch.seconds += self.clock() - started
        self._batches = [b for b in self._batches if b.live]
        if not self._batches and not self._waiting:  # idle: the kept buffers' memory goes back
            self._spare.clear()
        return out

    def fail_all(self, error: Exception) -> list[Finished]:
        """Fails every waiting and running sentence with ``error`` and empties the core (what an owner does when
        the core itself raised). Returns their results."""
        out, self._done_early = self._done_early, []
        everyone = [s for queue in self._waiting.values() for s in queue] + self._live
        out += [self._leave(s, error=error) for s in everyone]
        self._waiting, self._deadlines, self._started, self._batches, self._spare = {}, {}, set(), [], []
        return out

    # ---- sentences ---------------------------------------------------------------------------------------------

    def _search(self, src_len: int, options: DecodingOptions, prefix: list[int] | None) -> SentenceSearch:
        limit = options.length_limit(src_len, self.max_positions)
        if prefix:  # a forced prefix (at most max_length, submit) extends the source's bound, with room for eos
            limit = max(limit, min(len(prefix) + 1, options.max_length, self.max_positions - 1))
        rules = Rules(min_length=options.min_length, no_repeat_ngram_size=options.no_repeat_ngram_size,
                      repetition_penalty=options.repetition_penalty,
                      prefixes=(tuple(prefix),) if prefix else None, banned_ids=self.banned_ids)
        if options.beam_size == 1:
            sampling = (Sampling(topk=options.sampling_topk, topp=options.sampling_topp,
                                 temperature=options.sampling_temperature, seed=options.seed)
                        if options.sampling else None)
            return GreedySearch(limit, self.bos_id, self.eos_id, rules, sampling, options.return_attention,
                                options.return_scores)
        return BeamSearch(limit, self.bos_id, self.eos_id, options.beam_size, options.length_penalty, options.n_best,
                          rules, options.return_attention)

    def _leave(self, sentence: _Sentence, hypotheses: list[Hypothesis] | None = None, error: Exception | None = None,
               aborted: bool = False) -> Finished:
        self._by_handle.pop(sentence.handle, None)
        if sentence.joined_at is not None:  # left the running decode (a sentence aborted while waiting never joined)
            self.stats.left += 1
        if hypotheses:
            self.stats.generated_tokens += len(hypotheses[0].tokens)
        now = time.monotonic()
        joined = sentence.joined_at if sentence.joined_at is not None else now
        return Finished(sentence.handle, hypotheses or [], error, aborted, joined - sentence.submitted_at, now - joined)

    def _drop_aborted(self) -> list[Finished]:
        out = []
        for group in list(self._waiting):
            queue = self._waiting[group]
            aborted = [self._leave(s, aborted=True) for s in queue if s.aborted]
            if aborted:
                out += aborted
                queue = collections.deque(s for s in queue if not s.aborted)
                self._waiting[group] = queue
            if not queue:
                del self._waiting[group]
                self._deadlines.pop(group, None)
                self._started.discard(group)
        for batch in self._batches:
            if any(s.aborted for s in batch.live):
                out += [self._leave(s, aborted=True) for s in batch.live if s.aborted]
                keep = [s for s in batch.live if not s.aborted]
                self._relayout(batch, keep, [s.rows for s in keep])
        self._batches = [b for b in self._batches if b.live]
        return out

    # ---- scheduling --------------------------------------------------------------------------------------------

    def _schedule(self) -> list[_Sentence]:
        """The waiting sentences that join at this step (policy in the module docstring), removed from the queue."""
        if not self._waiting:
            return []
        live = self._live  # every batch's sentences, gathered once
        if live and self.policy == "static":
            return []
        if live and self.policy == "refill" and any(
                b.rows * REFILL_FRACTION > b.peak_rows for b in self._batches):  # not yet drained to its tail
            return []
        rows = sum(s.search.max_rows for s in live)
        n_sentences = len(live)
        longest = max((len(s.src_ids) for s in live), default=0)
        rows_of_group: dict[object, int] = collections.Counter()
        sentences_of_group: dict[object, int] = collections.Counter()
        for s in live:
            rows_of_group[s.group] += s.search.max_rows
            sentences_of_group[s.group] += 1
        # A request already running refills the batch only when a quarter of a budget is free, so that its
        # sentences join in groups (one encoder call) rather than one per step. Measured when each join also copied
        # the whole cache (300 test sentences, beam 4: joins at 148 of 155 steps cost 15% of the time); joins copy
        # no cache now. A request with nothing running joins at once.
        room = (self.max_batch_rows - rows >= self.max_batch_rows / 4
                and self.max_batch_tokens - n_sentences * longest >= self.max_batch_tokens / 4)

        def small(g: object) -> bool:  # a small request: its sentences live or waiting
            return sentences_of_group[g] + len(self._waiting[g]) <= SMALL_REQUEST

        def urgent(g: object) -> bool:  # joins now, overdrawing a full budget if it must
            return rows_of_group[g] == 0 or small(g)

        if live and not room and not any(urgent(g) for g in self._waiting):
            return []
        arrival = {group: i for i, group in enumerate(self._waiting)}

        def order(g: object) -> tuple:
            # A small request that has started goes first (its sentences join together); a larger one after
            # those that have not (every request starts at the next step).
            is_small, started = small(g), g in self._started
            return (not is_small, not started if is_small else started, self._deadlines.get(g, NO_DEADLINE),
                    rows_of_group[g], arrival[g])

        joining = []
        while self._waiting:
            group = min(self._waiting, key=order)
            sentence = self._waiting[group][0]
            new_longest = max(longest, len(sentence.src_ids))
            fits = (rows + sentence.search.max_rows <= self.max_batch_rows
                    and (n_sentences + 1) * new_longest <= self.max_batch_tokens)
            # A group with nothing running may overdraw a full budget by one sentence, and a small request by all
            # of its sentences (up to twice the budget), so that a short request never waits for a large one's
            # sentences to finish before it starts or before its second sentence does.
            starved = (self.policy == "continuous" and urgent(group)
                       and rows + sentence.search.max_rows <= 2 * self.max_batch_rows
                       and (n_sentences + 1) * new_longest <= 2 * self.max_batch_tokens)
            if not (fits or starved) and (n_sentences or joining):
                break
            sentence.small = self.max_batches > 1 and small(group)
            sentences_of_group[group] += 1
            self._waiting[group].popleft()
            self._started.add(group)
            if not self._waiting[group]:
                del self._waiting[group]
                self._deadlines.pop(group, None)
                self._started.discard(group)
            joining.append(sentence)
            rows += sentence.search.max_rows
            rows_of_group[group] += sentence.search.max_rows
            n_sentences, longest = n_sentences + 1, new_longest
        return joining

    # ---- the batch's state -------------------------------------------------------------------------------------

    @staticmethod
    def _expected_steps(s: _Sentence) -> int:
        """Decoder steps ``s`` is expected to run still: its source's length (a translation is about as long), at
        least its min_length, at most its limit, less the steps it has run."""
        search = s.search
        return max(0, min(search.limit, max(search.rules.min_length, len(s.src_ids))) - s.step)

    def _batch_for_joiners(self, joining: list[_Sentence], small: bool) -> _Batch:
        """The batch this step's ``joining`` sentences of small requests (``small``) or of larger ones go into: the
        youngest batch of their kind unless it is expected to outlive them by more than ``outlive_steps`` and
        another batch of their kind may start; else a new one, whose decoder time starts level with the least of
        the others (so it neither waits for them nor shuts them out)."""
        kind = [b for b in self._batches if b.small == small]
        youngest = kind[-1] if kind else None
        if youngest is not None:
            outlives = (max(self._expected_steps(s) for s in youngest.live)
                        - max(self._expected_steps(s) for s in joining))
            if outlives <= self.outlive_steps or len(kind) >= self.max_batches:
                return youngest
        batch = _Batch(small=small, seconds=min((b.seconds for b in self._batches), default=0.0))
        self._batches.append(batch)
        return batch

    def _fit(self, needed: int, current: int) -> int:
        """Rows (or sentence slots) a buffer should have for ``needed`` in use when it has ``current``: exactly
        ``needed`` for ops that copy anyway; for in-place ops the current size while it fits and is not four times
        too big, else twice what is needed (at least 16, at most twice ``max_batch_rows``), so that joins and beams
        that widen write into spare rows and a buffer is reallocated a few times in a batch's life, not at every
        join. Under "static" and "refill" a buffer never shrinks while it fits: the batch's next sentences (a
        refill's joiners) take its rows, and a copy into a smaller buffer would only shorten how long it is held."""
        if not self.ops.in_place:
            return needed
        if needed <= current and (self.policy != "continuous" or not (current > 64 and 4 * needed <= current)):
            return current
        # No batch holds more than twice the rows budget (a starved request's overdraw): no spare beyond it.
        return max(needed, min(max(2 * needed, 16), 2 * self.max_batch_rows))

    def _positions(self, width: int, current: int) -> int:
        """Positions a self-attention buffer should have for rows of at most ``width`` cached keys/values (the
        step writes position ``width``): ops that copy the capacity with every reorder get it to CACHE_GROWTH;
        in-place ops, whose moves copy only used positions and whose step reads only each row's own (a capacity
        of 256 instead of 32 left a 160-row step's time unchanged), all the model's positions from the start
        when no step reads past a row's length (``cache_tail_unread``): the memory of positions never written is
        never supplied (state_ops.lazy_zeros), and the batch's cache never grows (each growth copied the cache into
        fresh memory, 1-7% of an int8 beam-4 list of 500 sentences; docs/performance.md); else they double it and
        halve it when 4x too big."""
        needed = _capacity(width)
        if not self.ops.in_place:
            return needed
        if self.cache_tail_unread:
            return _capacity(self.max_positions)
        if needed <= current and 4 * needed > current:
            return current
        return min(2 * needed, _capacity(self.max_positions))

    def _resize_cache(self, batch: _Batch, used: int, rows: int, capacity: int) -> list:
        """``ops.resize`` of ``batch``'s self-attention buffers: where the model's step reads no position past a
        row's length (``cache_tail_unread``: OnnxModel with GroupQueryAttention), the tails are left uninitialized
        and only the positions of the batch's oldest row are copied; else zeroed and copied whole."""
        if self.cache_tail_unread:
            return self.ops.resize(batch.self_, used, rows, capacity, unread_tail=True, cached=batch.width)
        return self.ops.resize(batch.self_, used, rows, capacity)

    def _spare_buffers(self, rows: int) -> list | None:
        """The smallest kept buffer set of an ended batch with at least ``rows`` rows (taken), or None. Reusing them
        saves a new batch the allocation, page faults and growth copies of its first steps (its stale positions
        are never read: engine/contract.py)."""
        for i, buffers in enumerate(self._spare):
            if self.ops.shape(buffers[0])[0] >= rows:
                return self._spare.pop(i)
        return None

    def _encode(self, joining: list[_Sentence]) -> tuple[list, np.ndarray]:
        """The joiners' cross K then V per decoder layer, [len(joining), n_heads, src_width, d_head] (zero past each
        source), and their source mask bool [len(joining), src_width]; src_width = the longest source.

        With in-place ops (numpy on the CPU) the joiners, ordered by length (the caller keeps that order), are
        encoded in groups of like lengths, a new group wherever padding the group to the next length would cost more
        than ENCODER_CALL_TOKENS: the encoder's time is in proportion to its padded tokens (a list's last chunk
        of 16 sentences of 21-46 tokens was 736 positions for about 500 tokens). On a device, one call."""
        src_width = max(len(s.src_ids) for s in joining)
        src_mask = np.zeros((len(joining), src_width), dtype=bool)
        for row, s in enumerate(joining):
            src_mask[row, :len(s.src_ids)] = True
        groups, start = [], 0
        for i in range(1, len(joining) if self.ops.in_place else 0):
            extra = (len(joining[i].src_ids) - len(joining[i - 1].src_ids)) * (i - start)
            if extra > ENCODER_CALL_TOKENS:
                groups.append((start, i))
                start = i
        groups.append((start, len(joining)))
        parts = []
        for start, end in groups:
            width = max(len(s.src_ids) for s in joining[start:end])  # on a device the joiners are not sorted
            src_ids = np.full((end - start, width), self.pad_id, dtype=np.int64)
            for row, s in enumerate(joining[start:end]):
                src_ids[row, :len(s.src_ids)] = s.src_ids
            cross_k, cross_v = self.model.encode(src_ids, np.ascontiguousarray(src_mask[start:end, :width]))
            parts.append(list(cross_k) + list(cross_v))
        if len(parts) == 1:
            return parts[0], src_mask
        cross = [np.zeros((len(joining), x.shape[1], src_width, x.shape[3]), dtype=x.dtype) for x in parts[-1]]
        for (start, _), part in zip(groups, parts):
            cross = self.ops.write_rows(cross, start, part)
        return cross, src_mask

    def _join(self, batch: _Batch, joining: list[_Sentence]) -> None:
        """Encodes the joiners (:meth:`_encode`) and gives each one row of ``batch`` (a beam search widens after its
        first step) and a slot of its cross K/V. With in-place ops nothing of the running rows is copied: a
        joiner's keys/values start at position 0 of a spare row, and its cross K/V are written into a spare slot."""
        if self.ops.in_place:  # shortest first: like lengths side by side for _encode's groups
            joining = sorted(joining, key=lambda s: len(s.src_ids))
        cross, src_mask = self._encode(joining)
        src_width, n_layers = src_mask.shape[1], len(cross) // 2
        used, sentences = batch.rows, len(batch.live)
        if batch.cross is None:
            # In-place ops: spare slots from the start, so that the next joiners write into them.
            slots = self._fit(len(joining), 0)
            batch.cross = (self.ops.resize(cross, len(joining), slots, src_width, unread_rows=True)
                           if self.ops.in_place else cross)
            batch.src_mask = src_mask
            # One buffer per tensor: the step writes into each.
            batch.self_ = self._spare_buffers(len(joining)) or [
                self.ops.empty(cross[0], self._fit(len(joining), 0), self._positions(0, CACHE_GROWTH))
                for _ in range(2 * n_layers)]
        else:
            width = max(batch.src_mask.shape[1], src_width)
            slots = self._fit(sentences + len(joining), self.ops.shape(batch.cross[0])[0])
            if width != self.ops.shape(batch.cross[0])[2] or (self.ops.in_place
                                                             and slots != self.ops.shape(batch.cross[0])[0]):
                batch.cross = self.ops.resize(batch.cross, sentences, slots, width, unread_rows=True)
            batch.cross = self.ops.write_rows(batch.cross, sentences, cross)
            batch.src_mask = np.concatenate([np.pad(batch.src_mask, ((0, 0), (0, width - batch.src_mask.shape[1]))),
                                             np.pad(src_mask, ((0, 0), (0, width - src_width)))])
            shape = self.ops.shape(batch.self_[0])
            rows = self._fit(used + len(joining), shape[0])
            if rows != shape[0]:
                batch.self_ = self._resize_cache(batch, used, rows, shape[2])
        for k, s in enumerate(joining):
            s.rows = np.asarray([used + k], dtype=np.int64)
        batch.rows += len(joining)
        batch.peak_rows = batch.rows  # rows since this join ("refill"): a beam's widening raises it (_relayout)
        batch.live += joining
        self.stats.joined += len(joining)
        now = time.monotonic()
        for s in joining:
            s.joined_at = now

    def _relayout(self, batch: _Batch, keep: list[_Sentence], parents: list[np.ndarray]) -> None:
        """Keeps the sentences of ``keep`` (in the batch's order), each with rows copied from ``parents`` (per
        sentence, int64 [its new n_rows]: the old rows its beams continue; its own rows when nothing reordered),
        and packs rows and cross K/V slots into the buffers' first rows.

        Copies as few rows as it can (all rows when the ops cannot write in place): the first beam of each parent
        stays in the parent's row, other beams of that parent take rows of beams that ended or of sentences that
        left, and rows in use beyond the new count move down into the holes; each copy takes only the positions
        its sentence has cached. Sentence slots past the new count move into the slots of sentences that left."""
        if not keep:  # the batch is dropped by the caller; a new batch may reuse its buffers (up to a budget's rows)
            if (self.ops.in_place and batch.self_ is not None
                    and self.ops.shape(batch.self_[0])[0] <= self.max_batch_rows):
                self._spare = sorted(self._spare + [batch.self_], key=lambda b: self.ops.shape(b[0])[0])
                del self._spare[:-SPARE_BUFFERS]
            batch.live, batch.rows = [], 0
            batch.self_ = batch.cross = None
            return
        # Rows. Plain Python: a step has tens to hundreds of rows, where numpy's per-call cost would dominate.
        every = [r for p in parents for r in p.tolist()]
        n = len(every)
        rows, pending, occupied = [], [], set()
        for i, r in enumerate(every):
            if r < n and r not in occupied:  # each parent's first beam, if its row is below the new count
                occupied.add(r)
                rows.append(r)
            else:
                rows.append(-1)
                pending.append(i)
        dst = src = np.zeros(0, dtype=np.int64)
        length: list[int] = []
        start: list[int] = []
        if pending:
            free = [r for r in range(n) if r not in occupied]  # as many as beams without a row
            step_of = [s.step for s, p in zip(keep, parents) for _ in range(len(p))]
            length = [step_of[i] for i in pending]  # each moved row's own cached positions
            start = self._into_siblings(keep, parents, every, pending, free, rows)
            rest = iter(free)  # the free rows no sibling took
            for i in pending:
                if rows[i] < 0:
                    rows[i] = next(rest)
            dst, src = (np.asarray([rows[i] for i in pending], dtype=np.int64),
                        np.asarray([every[i] for i in pending], dtype=np.int64))
        shape = self.ops.shape(batch.self_[0])
        if self.ops.in_place and shape[0] < n:  # beams widened past the spare rows
            batch.self_ = self._resize_cache(batch, batch.rows, self._fit(n, shape[0]), shape[2])
        batch.self_ = self.ops.move_rows(batch.self_, dst, src, length, n, start=start)
        batch.rows = n
        batch.peak_rows = max(batch.peak_rows, n)
        start = 0
        for s, p in zip(keep, parents):
            s.rows = np.asarray(rows[start:start + len(p)], dtype=np.int64)
            start += len(p)
        # Sentence slots (cross K/V, source mask).
        if len(keep) < len(batch.live):
            slot_of = {id(s): i for i, s in enumerate(batch.live)}
            slots = np.asarray([slot_of[id(s)] for s in keep], dtype=np.int64)
            stays = slots < len(keep)
            live: list = [None] * len(keep)
            for k in np.flatnonzero(stays):
                live[slots[k]] = keep[k]
            holes = np.asarray([i for i, s in enumerate(live) if s is None], dtype=np.int64)
            movers = slots[~stays]
            for hole, k in zip(holes, np.flatnonzero(~stays)):
                live[hole] = keep[k]
            width = self.ops.shape(batch.cross[0])[2]
            batch.cross = self.ops.move_rows(batch.cross, holes, movers, width, len(keep))
            batch.src_mask[holes] = batch.src_mask[movers]
            batch.live = live
            src_width = max(len(s.src_ids) for s in live)
            slots_now = self.ops.shape(batch.cross[0])[0]
            fit = self._fit(len(live), slots_now)
            if src_width < width or fit != slots_now:  # the longest source left: cross-attention reads less
                batch.cross = self.ops.resize(batch.cross, len(live), fit, src_width, unread_rows=True)
            batch.src_mask = np.ascontiguousarray(batch.src_mask[:len(live), :src_width])
        else:
            batch.live = keep
        # Spare room that grew too big (in-place ops), or the capacity the reorder copies (ops that copy). A static
        # batch takes no joiners and only shrinks: its buffers are already at their peak, and a copy to smaller
        # ones would only shorten how long it holds them (it cost 2.5% of an int8 beam-4 list of 500 sentences).
        # A refilled batch gives its joiners these buffers' rows (_join grows them only when they do not suffice).
        if self.policy != "continuous" and self.ops.in_place:
            return
        shape = self.ops.shape(batch.self_[0])
        rows_fit, capacity = self._fit(n, shape[0]), self._positions(batch.width, shape[2])
        if (rows_fit, capacity) != (shape[0], shape[2]) and (self.ops.in_place or capacity < shape[2]):
            batch.self_ = self._resize_cache(batch, n, rows_fit, capacity)

    @staticmethod
    def _into_siblings(keep: list[_Sentence], parents: list[np.ndarray], every: list[int], pending: list[int],
                       free: list[int], rows: list[int]) -> list[int]:
        """For _relayout: gives each moved beam (``pending``, ascending indices into ``every``, the parent row of
        each new row), where it can, the row of a beam of its own sentence that ended at this step, taken from
        ``free`` and written into ``rows``; returns per moved beam the first cache position its copy needs (0 for
        the others, which take the free rows left, in order).

        The two rows' caches already agree on every position of their common token prefix (a key/value depends
        only on the tokens up to its position, and a beam's cache is its ancestors', copied), so only the positions
        after it are copied: a fifth of the positions of the moves on the test split at beam 4 (docs/performance.md,
        "Beams that reuse a sibling's row")."""
        start = [0] * len(pending)
        free_rows = set(free)
        j, end = 0, 0  # pending[j]: the next moved beam; end: past the current sentence's new beams
        for sentence, p in zip(keep, parents):
            end += len(p)
            if j == len(pending) or pending[j] >= end:
                continue
            alike = getattr(sentence.search, "cached_alike", None)
            old = sentence.rows.tolist() if alike is not None else []
            ended = [b for b, r in enumerate(old) if r in free_rows]  # its beams no new beam continues, in rows < n
            while j < len(pending) and pending[j] < end:
                if ended:  # the first such sibling: on the test split the best one would copy 1% fewer positions
                    i, b = pending[j], ended.pop(0)
                    rows[i], start[j] = old[b], min(alike(old.index(every[i]), b), sentence.step)
                    free_rows.discard(old[b])
                j += 1
        free[:] = [r for r in free if r in free_rows]
        return start

    # ---- one decoder step --------------------------------------------------------------------------------------

    def _views(self, batch: _Batch) -> tuple[list, list]:
        """The used rows of the batch's self-attention buffers and cross K/V slots, for a step: the same view
        objects as at the last step while the buffers and counts are the same, so that the model's kept binding
        (engine/runtime.py) knows them at once instead of reading each one's address (about 1 us each, 18 a step
        for the bundled model)."""
        made = batch.views
        if (made is None or made[0] is not batch.self_ or made[1] is not batch.cross
                or made[2] != (batch.rows, len(batch.live))):
            made = batch.views = (batch.self_, batch.cross, (batch.rows, len(batch.live)),
                                  [self.ops.view(x, batch.rows) for x in batch.self_],
                                  [self.ops.view(x, len(batch.live)) for x in batch.cross])
        return made[3], made[4]

    def _wants_top(self, search: SentenceSearch) -> bool:
        return self.has_top_k and search.top_k is not None and (self.device_top_k or search.max_rows > 1)

    def _greedy_rows(self, batch: _Batch) -> bool:
        """Whether a step of ``batch`` can take :meth:`_greedy_step`: every sentence a :attr:`GreedySearch.plain`
        one (an argmax under bans and min_length) without return_attention, sentence i in row i, scores on the
        host (no device top-k) of a float32 graph."""
        if self.device_top_k or batch.rows != len(batch.live) or getattr(self.model, "float16", False):
            return False
        for i, s in enumerate(batch.live):
            search = s.search
            if type(search) is not GreedySearch or not search.plain or s.return_attention or s.rows[0] != i:
                return False
        return True

    def _greedy_step(self, batch: _Batch) -> list[Finished]:
        """One decoder step of a batch of plain greedy sentences (:meth:`_greedy_rows`): the tokens, scores and
        failures of :meth:`_decode_step`, with one argmax over all rows in place of the general step's layout of
        rows, its candidates per sentence and its branches per row: a tenth of the host's time outside ONNX
        Runtime in a greedy list (docs/performance.md)."""
        live = batch.live
        steps = [s.step for s in live]
        tokens = np.concatenate([s.search.last_tokens for s in live])[:, None]
        scores = self._run_step(batch, tokens, np.asarray(steps, dtype=np.int64), None, None,
                                all(s.search.reads_logits for s in live))[0]
        best = scores.argmax(axis=1)
        values = scores[np.arange(len(live)), best]  # float32, as batch_choose gives them
        out, keep = [], []
        for i, (s, token) in enumerate(zip(live, best.tolist())):
            search = s.search
            try:
                if token in search.rules.banned_ids or (token == search.eos_id and s.step < search.rules.min_length):
                    search.advance(s.step, scores[i:i + 1], None, None)  # its rules over its row, then the argmax
                else:
                    search.advance(s.step, None, None, None, (token, values[i]))
            except Exception as e:  # noqa: BLE001 - this sentence fails alone
                out.append(self._fail_alone(batch, s, e))
                continue
            self._stepped(s, out, keep)
        if len(keep) < len(live):
            self._relayout(batch, keep, [s.rows for s in keep])
        return out

    def _run_step(self, batch: _Batch, tokens: np.ndarray, positions: np.ndarray, row_sentence: np.ndarray | None,
                  k: int | None, logits: bool):
        """The model's step over ``batch``'s rows (tokens int64 [rows, 1], positions and row_sentence int64 [rows],
        in buffer row order; row_sentence None: row i is sentence i's); the cache is grown first if the oldest row's
        next key/value would not fit; top ``k`` on the device when given, logits instead of log-probs when
        ``logits`` and the model gives them. Returns the model's (scores, self_k, self_v, attention), its caches
        kept in ``batch``."""
        n_layers = len(batch.self_) // 2
        oldest = int(positions.max())
        shape = self.ops.shape(batch.self_[0])
        if oldest >= shape[2]:  # the oldest row's next key/value would not fit
            batch.self_ = self._resize_cache(batch, batch.rows, shape[0], self._positions(oldest, shape[2]))
        caches, cross = self._views(batch)
        logits_only = {"log_softmax": False} if logits and self.logits_on_request else {}
        result = self.model.step(tokens, caches[:n_layers], caches[n_layers:], cross[:n_layers], cross[n_layers:],
                                 batch.src_mask, k, positions=positions, row_sentence=row_sentence, check_nan=False,
                                 **logits_only)
        returned = list(result[1]) + list(result[2])
        if any(r is not c for r, c in zip(returned, caches)):  # a model that returns new caches (a scripted one)
            batch.self_ = returned
        self.stats.steps += 1
        self.stats.rows += len(tokens)
        return result

    def _stepped(self, s: _Sentence, out: list[Finished], keep: list[_Sentence]) -> bool:
        """Counts the step ``s``'s search has just advanced: a finished sentence leaves (into ``out``), another goes
        on (into ``keep``). Returns whether it goes on."""
        s.step += 1
        if s.search.done:
            out.append(self._leave(s, s.search.hypotheses))
            return False
        keep.append(s)
        return True

    def _fail_alone(self, batch: _Batch, s: _Sentence, error: Exception) -> Finished:
        """``s`` leaves ``batch`` with ``error``; the other sentences go on."""
        log.warning("sentence %d failed at step %d: %s", s.handle, s.step, error)
        if self.ops.in_place:  # its rows go to other sentences: no inf of an overflow left to be masked
            for x in batch.self_:
                x[s.rows] = 0
        return self._leave(s, error=error)

    @staticmethod
    def _step_inputs(live: list[_Sentence]):
        """The inputs of a step over the rows of ``live``: (n_rows, starts, where, in_order, tokens, positions,
        row_sentence): each sentence's row count and first row in the sentences' order (starts, one more at the
        end), the buffer row of each row in that order (where, int64 [rows]) and whether that is 0 .. rows - 1, and
        the model's tokens int64 [rows, 1], positions and row_sentence int64 [rows], in buffer row order."""
        n_rows = [s.search.n_rows for s in live]
        starts = list(itertools.accumulate(n_rows, initial=0))  # each sentence's first row, in order
        where = np.concatenate([s.rows for s in live])  # the buffer row of each of those rows
        in_order = bool((where == np.arange(len(where))).all())
        tokens = np.concatenate([s.search.last_tokens for s in live])[:, None]
        positions = np.repeat(np.asarray([s.step for s in live], dtype=np.int64), n_rows)
        row_sentence = np.repeat(np.arange(len(live)), n_rows)
        if not in_order:  # the step's inputs go to the buffer rows
            tokens[where], positions[where], row_sentence[where] = tokens.copy(), positions.copy(), row_sentence.copy()
        return n_rows, starts, where, in_order, tokens, positions, row_sentence

    def _beam_rows(self, batch: _Batch) -> bool:
        """Whether a step of ``batch`` can take :meth:`_beam_step`: every sentence a beam search reading its rows'
        top-k (no rule but bans and min_length, :func:`engine.search.top_k_for`) without return_attention, the
        top-k computed on the host."""
        if self.device_top_k or not self.has_top_k:
            return False
        for s in batch.live:
            if type(s.search) is not BeamSearch or s.search.top_k is None or s.return_attention:
                return False
        return True

    def _beam_step(self, batch: _Batch) -> list[Finished]:
        """One decoder step of a batch of beam searches (:meth:`_beam_rows`): the tokens, scores and failures of
        :meth:`_decode_step`, the searches advanced together (:meth:`BeamSearch.batch_advance`) instead of through
        the general step's per-sentence outputs and branches."""
        live = batch.live
        n_rows, starts, where, in_order, tokens, positions, row_sentence = self._step_inputs(live)
        log_probs = self._run_step(batch, tokens, positions, row_sentence, None, False)[0]
        top = ban(self.model.top_k(log_probs, max(s.search.top_k for s in live)), self.banned_ids)
        if not in_order:  # [rows, k] into the sentences' order
            top = TopCandidates(top.log_probs[where], top.ids[where], top.vocab)
        nan = np.isnan(top.log_probs.max(axis=1))  # as _decode_step: a sentence with a NaN row fails alone
        failed = {i for i in range(len(live)) if nan[starts[i]:starts[i + 1]].any()} if nan.any() else set()
        advanced, others = BeamSearch.batch_advance(
            [(i, s.search) for i, s in enumerate(live) if i not in failed], top, dict(enumerate(starts[:-1])))
        out, keep, parents = [], [], []
        for i, s in enumerate(live):
            local = advanced.get(i)
            if local is None:
                try:
                    if i in failed:
                        raise NumericalError()
                    local = s.search.advance(s.step, None, None, None, others[i])
                except Exception as e:  # noqa: BLE001 - this sentence fails alone
                    out.append(self._fail_alone(batch, s, e))
                    continue
            if self._stepped(s, out, keep):
                parents.append(s.rows[local])
        if len(keep) < len(live) or not np.array_equal(np.concatenate(parents), where):
            self._relayout(batch, keep, parents)
        return out

    def _decode_step(self, batch: _Batch) -> list[Finished]:
        if self._greedy_rows(batch):
            return self._greedy_step(batch)
        if self._beam_rows(batch):
            return self._beam_step(batch)
        live = batch.live
        n_rows, starts, where, in_order, tokens, positions, row_sentence = self._step_inputs(live)
        first_row = where[starts[:-1]].tolist()  # each sentence's first buffer row, as Python ints
        wants_top = [self._wants_top(s.search) for s in live]
        k = max((s.search.top_k for s, w in zip(live, wants_top) if w), default=None)
        # With the log-probs on a device and every sentence reading top-k only, they never leave it.
        device_top = k is not None and self.device_top_k and all(wants_top)
        # Rows that all take an argmax and report no score read the logits (or, on a device, their top-1): no
        # log-softmax over the vocabulary.
        scores, _, _, attention = self._run_step(batch, tokens, positions, row_sentence, k if device_top else None,
                                                 all(s.search.reads_logits for s in live))
        top, top_row, top_in_order = None, {}, in_order
        if device_top:
            top, log_probs = ban(scores, self.banned_ids), None
            top_row = dict(enumerate(starts[:-1]))
        else:
            log_probs = scores
            if k is not None:  # top-k of the rows that read it, in one call
                rows = (log_probs if all(wants_top) else log_probs[np.concatenate(  # no copy when every row reads it
                    [s.rows for s, w in zip(live, wants_top) if w])])
                top = ban(self.model.top_k(rows, k), self.banned_ids)
                if all(wants_top):
                    top_row = dict(enumerate(starts[:-1]))
                else:
                    top_in_order = True  # rows gathered in the sentences' order above
                    cursor = 0
                    for i, w in enumerate(wants_top):
                        if w:
                            top_row[i] = cursor
                            cursor += n_rows[i]
        if top is not None and not top_in_order:  # [rows, k] into the sentences' order
            top = TopCandidates(top.log_probs[where], top.ids[where], top.vocab)
        # NaN is how a float16 overflow shows (inf - inf in LayerNorm or softmax); -inf is a legitimate log-prob.
        # Checked for all rows at once, then on what each sentence reads, so that it fails alone: the top-k rows
        # always ([rows, k] costs nothing); full rows for float16 graphs only (a pass over [rows, vocab] is 1-3% of
        # a greedy step, for an overflow float32 graphs do not have; greedy search still refuses a NaN it picks).
        nan_top = np.isnan(top.log_probs.max(axis=1)) if top is not None else None
        nan_full = (np.isnan(log_probs.max(axis=1)) if log_probs is not None and len(top_row) < len(live)
                    and getattr(self.model, "float16", False) else None)
        nan_top = nan_top if nan_top is not None and nan_top.any() else None
        nan_full = nan_full if nan_full is not None and nan_full.any() else None
        candidates = BeamSearch.batch_candidates(
            [(i, s.search) for i, s in enumerate(live) if i in top_row and isinstance(s.search, BeamSearch)],
            top, top_row) if top is not None else {}
        if log_probs is not None:
            candidates.update(GreedySearch.batch_choose(
                [(i, s.search, s.step, first_row[i]) for i, s in enumerate(live) if i not in top_row
                 and isinstance(s.search, GreedySearch) and s.search.plain], log_probs))
        out, keep, parents = [], [], []
        for i, s in enumerate(live):
            n = n_rows[i]
            # A sentence's rows of [rows, ...] outputs: a view for one row, a copy of its rows for beams.
            mine = slice(first_row[i], first_row[i] + 1) if n == 1 else s.rows
            mine_top = mine_lp = None
            chosen = candidates.get(i)
            if i in top_row:
                t0 = top_row[i]
                if chosen is None:  # else its candidates were computed for the whole step
                    mine_top = TopCandidates(top.log_probs[t0:t0 + n], top.ids[t0:t0 + n], top.vocab)
                nan = nan_top is not None and nan_top[t0:t0 + n].any()
            else:
                if chosen is None:  # a search given its candidates reads no log-probs
                    mine_lp = log_probs[mine]
                nan = nan_full is not None and nan_full[mine].any()
            try:
                if nan:
                    raise NumericalError()
                local = s.search.advance(s.step, mine_lp, mine_top,
                                         attention[mine, :len(s.src_ids)] if s.return_attention else None,
                                         chosen)
            except Exception as e:  # noqa: BLE001 - this sentence fails alone
                out.append(self._fail_alone(batch, s, e))
                continue
            if self._stepped(s, out, keep):
                # A single row continuing itself (greedy search, always) keeps its array: no numpy call per sentence.
                parents.append(s.rows if n == len(local) == 1 else s.rows[local])
        if len(keep) < len(live) or any(p is not s.rows and (len(p) != len(s.rows) or (p != s.rows).any())
                                        for s, p in zip(keep, parents)):
            self._relayout(batch, keep, parents)
        return out
