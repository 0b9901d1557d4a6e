"""The collectives of a compiled XLA program, read from its HLO text (``compiled.as_text()``).

A compiled SPMD program is the program of one device, so every shape here is a per-device shape.
Bytes are counted two ways: ``buffer`` counts whole arrays (all-to-all: its operand, the tuple
form summed over its operands; all-gather: its gathered result; reduce-scatter: its operand;
all-reduce and collective-permute: their operand), including the 1/G piece that stays on the
device; ``wire`` counts what leaves the device (all-to-all and all-gather (G-1)/G of the buffer,
reduce-scatter (G-1) x its result, all-reduce 2 (G-1)/G (ring algorithm), collective-permute its
size when some pair sends to another device). A collective inside a while loop is multiplied by
the loop's trip count (backend_config known_trip_count; nested loops multiply); a loop without a
known trip count is counted once and flagged. Conditional branches are counted as if taken. A
collective whose groups each hold one device moves 0 bytes; a collective-permute moves its size
when one of its pairs (even its only one) crosses devices, else 0.
"""

import math
import re

COLLECTIVES = ("all-to-all", "all-gather", "collective-permute", "all-reduce", "reduce-scatter")

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(condition|body|calls|to_apply|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _dtype_bytes(dtype: str) -> int | None:
  return 1 if dtype.startswith("f8") else _DTYPE_BYTES.get(dtype)


def shapes(type_str: str) -> list[tuple[str, tuple[int, ...], int]]:
  """(dtype, dims, bytes) for every array in an HLO type (a tuple type gives several)."""
  out = []
  for dtype, dims in _SHAPE.findall(type_str):
    size = _dtype_bytes(dtype)
    if size is None:
      continue
    shape = tuple(int(d) for d in dims.split(",") if d)
    out.append((dtype, shape, size * math.prod(shape)))
  return out


def _split_type(rest: str) -> tuple[str, str]:
  """Splits 'TYPE opcode(...)' after '=' into TYPE and the rest (TYPE may be a tuple)."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def parse(text: str) -> dict:
  """Computations of an HLO module: {name: [instruction dicts]}, and the entry's name.

  An instruction dict holds its name, type, opcode, the text after the type (attrs) and its line.
  """
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{") and "HloModule" not in line:
      m = _COMPUTATION.match(line)
      if m:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
        continue
    if current is None or line.strip() in ("", "}"):
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    type_str, rest = _split_type(m.group(2))
    op = re.match(r"([\w\-]+)\(", rest)
    comps[current].append(dict(name=m.group(1), type=type_str, opcode=op.group(1) if op else "",
                               attrs=rest, line=line))
  if entry is None:
    raise ValueError("no ENTRY computation found in the HLO text.")
  return dict(computations=comps, entry=entry)


def instructions(text: str, opcode: str) -> list[dict]:
  """Every instruction of ``opcode`` (or its asynchronous ``opcode-start``), in any computation."""
  return [ins for instrs in parse(text)["computations"].values() for ins in instrs
          if ins["opcode"] in (opcode, f"{opcode}-start")]


def _calls(comps: dict) -> tuple[dict, dict]:
  """Each computation's callees with how often one call runs them; loops of unknown length."""
  calls, unknown = {c: [] for c in comps}, {}
  for name, instrs in comps.items():
    for ins in instrs:
      trip = None
      if ins["opcode"] == "while":
        found = _TRIP.search(ins["attrs"])
        trip = int(found.group(1)) if found else None
      for kind, callee in _CALLEE.findall(ins["attrs"]):
        factor = 1
        if ins["opcode"] == "while" and kind in ("body", "condition"):
          factor = trip if trip is not None else 1
          if trip is None:
            unknown[callee] = ins["name"]
        if callee in comps:
          calls[name].append((callee, factor))
      for group in _BRANCHES.findall(ins["attrs"]):
        calls[name] += [(c, 1) for c in re.findall(r"%?([\w.\-]+)", group) if c in comps]
  return calls, unknown


def _multipliers(module: dict) -> tuple[dict, dict]:
  """How many times each computation runs per call of the entry, and loops of unknown length."""
  calls, unknown = _calls(module["computations"])
  order, seen = [], set()

  def visit(c):
    if c in seen:
      return
    seen.add(c)
    for callee, _ in calls[c]:
      visit(callee)
    order.append(c)

  visit(module["entry"])
  mult = {c: 0 for c in order}
  mult[module["entry"]] = 1
  for c in reversed(order):  # reverse post-order: every caller before its callees
    for callee, factor in calls[c]:
      mult[callee] += mult[c] * factor
  return mult, unknown


def _group_size(attrs: str, default: int) -> int:
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  return int(m.group(2)) if m else default


def _bytes(op: str, ins: dict, arrays: list, num_devices: int) -> tuple[int, float, float]:
  """Group size, buffer bytes and wire bytes of one execution of collective ``op``."""
  size = sum(a[2] for a in arrays)
  if op == "collective-permute":
    pairs = re.findall(r"\{(\d+),(\d+)\}", ins["attrs"].split("source_target_pairs=")[-1])
    moved = size if any(a != b for a, b in pairs) else 0
    return len(pairs), moved, moved
  if op == "all-to-all" and len(arrays) > 1:
    g = len(arrays)
  else:
    g = _group_size(ins["attrs"], num_devices)
  if op == "reduce-scatter":
    return g, size * g, size * (g - 1)
  if op == "all-reduce":
    return g, size, 2 * size * (g - 1) / g
  return g, size, size * (g - 1) / g  # all-to-all, all-gather


def collectives(text: str, num_devices: int) -> dict:
  """Every collective of a compiled per-device HLO, with its executions and bytes per call.

  Returns buffer_bytes and wire_bytes (totals), by_op (op -> count, executions, buffer_bytes,
  wire_bytes), ops (one dict per instruction, with ``source``: the JAX op name XLA recorded in
  its metadata, "" if none) and loops_of_unknown_length.
  """
  module = parse(text)
  mult, unknown = _multipliers(module)
  ops = []
  for comp, instrs in module["computations"].items():
    times = mult.get(comp, 0)
    if not times:
      continue
    for ins in instrs:
      opcode = ins["opcode"]
      base = opcode[:-len("-done")] if opcode.endswith("-done") else opcode
      if base not in COLLECTIVES or opcode.endswith("-start"):
        continue
      arrays = shapes(ins["type"])
      g, buffer, wire = _bytes(base, ins, arrays, num_devices)
      if g == 1 and base != "collective-permute":  # a group of one device (e.g. over a size-1
        buffer = wire = 0  # mesh axis) moves nothing; a permute's one pair may cross devices
      source = _OP_NAME.search(ins["attrs"])
      ops.append(dict(op=base, shapes=[f"{d}[{','.join(map(str, s))}]" for d, s, _ in arrays],
                      group=g, times=times, loop_unknown=comp in unknown,
                      buffer_bytes=buffer * times, wire_bytes=wire * times,
                      source=source.group(1) if source else ""))
  summary = {}
  for o in ops:
    s = summary.setdefault(o["op"], dict(count=0, executions=0, buffer_bytes=0, wire_bytes=0))
    s["count"] += 1
    s["executions"] += o["times"]
    s["buffer_bytes"] += o["buffer_bytes"]
    s["wire_bytes"] += o["wire_bytes"]
  return dict(buffer_bytes=sum(o["buffer_bytes"] for o in ops),
              wire_bytes=sum(o["wire_bytes"] for o in ops), by_op=summary, ops=ops,
              loops_of_unknown_length=len(unknown))


def largest_buffer(text: str) -> dict:
  """The largest array any instruction produces (evidence for what dominates memory)."""
  best = dict(bytes=0, shape="", op_name="")
  for line in text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    type_str, rest = _split_type(m.group(2))
    if type_str.startswith("("):
      continue  # tuples only bundle arrays listed elsewhere
    op_name = re.search(r'op_name="([^"]*)"', rest)
    for dtype, shape, size in shapes(type_str):
      if size > best["bytes"] or (size == best["bytes"] and op_name and not best["op_name"]):
        best = dict(bytes=size, shape=f"{dtype}[{','.join(map(str, shape))}]",
                    op_name=op_name.group(1) if op_name else "")
  return best
