"""What every bench script writes into its --out folder: NAME.json, NAME.md and NAME.png."""

import json
import os
import sys


def write(out: str, name: str, doc: dict, markdown: str, wall_s: float, plot=None) -> str:
  """Writes the JSON document, the markdown (plus a wall-time line) and the plot.

  ``plot(doc, path)`` draws the PNG and returns None, or a sentence saying why it did not (e.g.
  matplotlib missing), which is printed to stderr. Returns the markdown as written.
  """
  os.makedirs(out, exist_ok=True)
  json_path = os.path.join(out, f"{name}.json")
  with open(json_path, "w") as f:
    json.dump(doc, f, indent=1, default=float)
  md = markdown + f"\nWall time: {wall_s:.0f} s; JSON: {json_path}\n"
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write(md)
  if plot is not None:
    skipped = plot(doc, os.path.join(out, f"{name}.png"))
    if skipped:
      print(skipped, file=sys.stderr)
  return md
