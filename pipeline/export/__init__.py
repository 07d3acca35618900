"""Export: annotation output in the formats people and tools read. Imports :mod:`pipeline.inputs`
and :mod:`pipeline.annotate`.

- :mod:`.coco`: COCO instances JSON (RLE or polygons) and copies of the images in the masks' frame.
- :mod:`.tools`: Label Studio tasks (brush RLE), YOLO-seg labels.
- :mod:`.overlay`: PNG overlays of masks, outlines and captions.
- :mod:`.gallery`: the one-page HTML gallery of overlays (``ovsam show --html``).
"""
