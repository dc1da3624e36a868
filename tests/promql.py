"""The metric names in a PromQL expression, for tests that check dashboards and alerts name
only series fleetwise has. promtool checks the syntax; this only picks out names."""

import re

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BY = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_NAME = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{|\[|\)|$|\s|[-+*/<>=!,])")
_WORDS = {"sum", "avg", "max", "min", "count", "rate", "irate", "increase", "histogram_quantile", "by", "without",
          "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "topk", "bottomk", "clamp_min",
          "clamp_max", "abs", "time", "vector", "scalar", "offset", "delta", "deriv", "avg_over_time",
          "max_over_time", "min_over_time", "sum_over_time", "label_replace", "absent", "le", "sort_desc", "sort"}


def metric_names(expr: str) -> set[str]:
    text = _RANGE.sub("", _BY.sub("", _STRINGS.sub('""', expr)))
    text = re.sub(r"\{[^}]*\}", "{}", text)
    names = {m.group(1) for m in _NAME.finditer(text)}
    return {n for n in names if n not in _WORDS and not n.startswith("$") and not re.fullmatch(r"[0-9.e]+", n)}
