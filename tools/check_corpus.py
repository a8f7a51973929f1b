"""Reads a proxytune corpus with pylance, independently of the Rust code that wrote it.

Usage: check_corpus.py <corpus-root> <table>

Prints one JSON object: the table's row count, version, Arrow schema (name -> type string), the
keys of every row, and for the first row its decoded PNG size and mode. The Rust test that calls it
compares these with what it wrote; this script only reads.
"""
import io
import json
import os
import sys

import lance
from PIL import Image


def main() -> None:
    root, table = sys.argv[1], sys.argv[2]
    ds = lance.dataset(os.path.join(root, f"{table}.lance"))
    data = ds.to_table()
    out = {
        "rows": ds.count_rows(),
        "version": ds.version,
        "schema": {f.name: str(f.type) for f in ds.schema},
        "keys": data.column("key").to_pylist(),
    }
    if data.num_rows:
        png = data.column("image_png")[0].as_py()
        image = Image.open(io.BytesIO(png))
        image.load()
        out["first_image"] = {"width": image.width, "height": image.height, "mode": image.mode}
        out["first_row_width"] = data.column("width")[0].as_py()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
