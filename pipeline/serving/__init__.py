"""``ovsam serve``: interactive segment-and-name over HTTP.

- :mod:`.settings`: :class:`ServeSettings`, everything ``ovsam serve`` and the application builder take.
- :mod:`.cache`: the byte-bounded LRU with a TTL that holds image features and image bytes.
- :mod:`.service`: :class:`SegmentService`, the model side (embed, segment, everything, vocabularies), plain Python.
- :mod:`.detect`: :class:`DetectService`, the detect route's model side: an open-vocabulary detector's boxes of
  typed classes, each segmented and named by OV-SAM.
- :mod:`.requests`: request parsing and the API's 4xx errors (:class:`ApiError`), plain Python.
- :mod:`.inputs`: request bodies within their limit, JSON, and image URLs under the allowed prefixes.
- :mod:`.labelstudio`: Label Studio's ML-backend contract (label config, context, brush results) and its routes.
- :mod:`.api`: the FastAPI app (routes, limits, token, CORS, the browser page) over a backend.
- :mod:`.app`: the Ray Serve application: the ingress and the model deployment, and ``build_app`` for
  ``serve run`` / ``serve deploy``. Only this module imports ray.
"""
