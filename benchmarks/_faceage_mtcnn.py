"""The original FaceAge face extraction, timed: run by ``benchmarks/align.py`` with the interpreter of
the separate baseline environment (``make faceage-baseline``: TensorFlow CPU + ipazc's ``mtcnn``, the
library FaceAge's ``src/Face_Extract.py`` imports as ``from mtcnn.mtcnn import MTCNN``).

Per photo, as FaceAge's ``extract_face`` does: build a new ``MTCNN()``, ``detect_faces`` on the RGB
array, take the first result's box (``abs`` of x1, y1), crop the raw box (no alignment) and resize it.
Decoding is not timed (``align.py`` does not time it for our aligner either).

Usage: ``python _faceage_mtcnn.py PATHS.json`` (a JSON list of image paths); prints one JSON object:
``{"seconds": [...], "found": [...], "versions": {...}}``. Needs no network: mtcnn's weights ship in
its wheel.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    import mtcnn
    import numpy as np
    import tensorflow as tf
    from mtcnn.mtcnn import MTCNN
    from PIL import Image

    paths = json.loads(open(sys.argv[1]).read())
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 112
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    MTCNN().detect_faces(images[0])  # warm-up: TensorFlow's first graph build is not FaceAge's cost
    seconds, found = [], []
    for pixels in images:
        t = time.perf_counter()
        results = MTCNN().detect_faces(pixels)
        if results:
            x1, y1, width, height = results[0]["box"]
            x1, y1 = abs(x1), abs(y1)
            face = pixels[y1 : y1 + height, x1 : x1 + width]
            np.asarray(Image.fromarray(face).resize((size, size)))
        seconds.append(time.perf_counter() - t)
        found.append(bool(results))
    print(json.dumps({"seconds": seconds, "found": found,
                      "versions": {"tensorflow": tf.__version__, "mtcnn": getattr(mtcnn, "__version__", "?")}}))


if __name__ == "__main__":
    main()
