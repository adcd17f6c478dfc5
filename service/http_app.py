"""The one FastAPI application of the replica: its error handlers and HTTP hardening. Route classes
(service/app.py, service/page.py, service/compat/routes.py) register on it; Serve's ingress binds them to the
replica (routes a mixin defines are found through the class's MRO)."""

from fastapi import FastAPI

from service import http_security
from service.errors import install_handlers

api = FastAPI(title="Translation service", version="0.1.0",
              description="English->German Transformer on ONNX Runtime, batched by Ray Serve. Also speaks the "
                          "LibreTranslate API under /libretranslate and the DeepL API v2 under /deepl.")
install_handlers(api)
api.add_middleware(http_security.SecurityMiddleware)
