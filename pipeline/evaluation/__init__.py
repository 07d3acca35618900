"""Evaluation: ``ovsam eval``. Imports :mod:`pipeline.inputs`, :mod:`pipeline.annotate` and
:mod:`pipeline.training`.

- :mod:`.prompts`: the paper's interactive protocol (GT box / centre point per instance; IoU and top-1), on Ray.
- :mod:`.coco`: COCO mask and box AP of an annotation output, all / base / novel and per class.
- :mod:`.compare`: two runs' agreement: paired instances, label agreement, IoU and score shift.
- :mod:`.report`: the self-contained HTML report pages of the three.
"""
