"""The pd benchmark's report: its targets, the notes on what the numbers mean, the tables it
prints and its plot (end-to-end latency per prompt length, KV transfer against the socket)."""

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fleetwise.bench.harness import AT_LEAST, AT_MOST, Target, figure, finish, mark, targets_table
from fleetwise.bench.pd.e2e import MODES

TARGET_LENGTH = 2048      # the end-to-end target is stated for 2k-token prompts
TARGETS = {
    "kv_over_socket": Target(AT_LEAST, 0.5, "KV transfer / raw socket copy (worst prompt length)", ">= 50%"),
    "disaggregated_over_colocated_e2e": Target(
        AT_MOST, 1.10, f"disaggregated / colocated E2E at {TARGET_LENGTH} tokens (median)", "<= 1.10"),
}


def e2e_notes(e2e_rows: dict[str, dict], notes: list[str]) -> float | None:
    """The end-to-end target's measure (None without 2k-token prompts); notes on how firm it is."""
    for L, row in e2e_rows.items():
        if row["disaggregated"]["kv_recomputes"]:
            notes.append(f"{L} tokens: {row['disaggregated']['kv_recomputes']:.0f} disaggregated requests "
                         "recomputed the prompt instead of pulling its KV (see the decode log)")
    target_ratio = e2e_rows.get(str(TARGET_LENGTH), {}).get("ratio_median")
    if target_ratio is None:
        notes.append(f"no {TARGET_LENGTH}-token prompts in this run: the end-to-end target is not checked")
    else:
        row = e2e_rows[str(TARGET_LENGTH)]
        spread = max((row[m]["e2e_s"]["max"] - row[m]["e2e_s"]["min"]) / row[m]["e2e_s"]["median"] for m in MODES)
        if spread > 0.10:
            notes.append(f"end to end at {TARGET_LENGTH} tokens: repeats of one mode differ by up to "
                         f"{spread * 100:.0f}% of their median, more than the 10% target allows; for a firm "
                         "check use more --repeats on a quiet machine")
    return target_ratio


def kv_notes(kv_rows: dict[str, dict], notes: list[str]) -> float | None:
    """The KV target's measure, the worst length's ratio; a note on where a pull's time goes."""
    if kv_rows:
        share = sum(r["http_read_s"]["median"] for r in kv_rows.values()) / sum(
            r["kv_s"]["median"] for r in kv_rows.values())
        notes.append(f"KV pull time (all lengths, medians): {share * 100:.0f}% passes before the stream has "
                     f"arrived (the same stream only read), {100 - share * 100:.0f}% goes to the receiver's checks "
                     "and copies")
    return min((r["ratio"] for r in kv_rows.values()), default=None)


def _mbs(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / 1e6:,.0f}"


def _cpu(cpu: dict | None) -> str:
    return "-" if not cpu else f"{cpu['receiver']:.1f} / {cpu['sender']:.1f}"


def print_summary(console: Console, report: dict) -> None:
    kv = report["kv_transfer"]["by_length"]
    kv_target = TARGETS["kv_over_socket"]
    t = Table(title="KV transfer (median of trials, MB/s): full pull (HTTP + check + copy into a cache), the same "
                    "stream only read, and a raw loopback socket copy of the same bytes")
    for col in ("prompt tokens", "stream MiB", "KV pull ms", "KV MB/s", "HTTP read MB/s", "socket ms",
                "socket MB/s", "KV / socket", "best / best", ">= 50%", "CPU ms/pull recv / send",
                "decode worker MB/s"):
        t.add_column(col, justify="right")
    for L, row in kv.items():
        dw = report["e2e"]["by_length"].get(L, {}).get("disaggregated", {}).get("decode_worker_kv_bps")
        t.add_row(L, f"{row['bytes'] / 2**20:.1f}", f"{row['kv_s']['median'] * 1e3:.1f}", _mbs(row["kv_bps"]),
                  _mbs(row["http_read_bps"]), f"{row['socket_s']['median'] * 1e3:.1f}", _mbs(row["socket_bps"]),
                  f"{row['ratio'] * 100:.1f}%", f"{row['ratio_best'] * 100:.1f}%",
                  mark(kv_target.met(row["ratio"])), _cpu(row.get("cpu_ms_per_pull")), _mbs(dw))
    agg = report["kv_transfer"]["overall"]
    t.add_row("all", f"{agg['bytes'] / 2**20:.1f}", f"{agg['kv_s'] * 1e3:.1f}", _mbs(agg["kv_bps"]),
              _mbs(agg["http_read_bps"]), f"{agg['socket_s'] * 1e3:.1f}", _mbs(agg["socket_bps"]),
              f"{agg['ratio'] * 100:.1f}%", "", mark(kv_target.met(agg["ratio"])), "", "",
              style="bold")
    console.print(t)

    e = Table(title=f"end to end, {report['config']['max_tokens']} output tokens, streamed through the router "
                    "(median of repeats; mean in brackets)")
    for col in ("prompt tokens", "disagg E2E ms", "coloc E2E ms", "disagg / coloc", "disagg TTFT ms",
                "coloc TTFT ms", "decode-side KV pull ms", "same text"):
        e.add_column(col, justify="right")
    for L, row in report["e2e"]["by_length"].items():
        d, c = row["disaggregated"], row["colocated"]
        pull = d.get("decode_worker_kv_s")
        e.add_row(L, f"{d['e2e_s']['median'] * 1e3:.0f} ({d['e2e_s']['mean'] * 1e3:.0f})",
                  f"{c['e2e_s']['median'] * 1e3:.0f} ({c['e2e_s']['mean'] * 1e3:.0f})",
                  f"{row['ratio_median']:.3f} ({row['ratio_mean']:.3f})",
                  f"{d['ttft_s']['median'] * 1e3:.0f}" if d["ttft_s"] else "-",
                  f"{c['ttft_s']['median'] * 1e3:.0f}" if c["ttft_s"] else "-",
                  f"{pull['median'] * 1e3:.1f}" if pull else "-",
                  f"{row['same_text']}/{row['requests']}")
    console.print(e)

    tv = report["targets"]
    kv_all, ratio = report["kv_transfer"]["worst_ratio"], report["e2e"]["target_ratio"]
    console.print(targets_table([
        (TARGETS["kv_over_socket"].label, "-" if kv_all is None else f"{kv_all * 100:.1f}%",
         TARGETS["kv_over_socket"].shown, tv["kv_over_socket"]),
        (TARGETS["disaggregated_over_colocated_e2e"].label, "-" if ratio is None else f"{ratio:.3f}",
         TARGETS["disaggregated_over_colocated_e2e"].shown, tv["disaggregated_over_colocated_e2e"])]))


def plot(report: dict, path: Path) -> None:
    fig, axes = figure(2, (13, 4.8))
    ax = axes[0]
    e2e = report["e2e"]["by_length"]
    lengths = [int(L) for L in e2e]
    colors = {"disaggregated": "#dd8452", "colocated": "#4c72b0"}
    for mode in MODES:
        med = [e2e[str(L)][mode]["e2e_s"]["median"] * 1e3 for L in lengths]
        lo = [e2e[str(L)][mode]["e2e_s"]["min"] * 1e3 for L in lengths]
        hi = [e2e[str(L)][mode]["e2e_s"]["max"] * 1e3 for L in lengths]
        ax.plot(lengths, med, marker="o", color=colors[mode], label=f"{mode} E2E")
        ax.fill_between(lengths, lo, hi, color=colors[mode], alpha=0.15)
        ttft = [(e2e[str(L)][mode]["ttft_s"] or {}).get("median", np.nan) * 1e3 for L in lengths]
        ax.plot(lengths, ttft, marker=".", ls="--", color=colors[mode], label=f"{mode} TTFT")
    for L in lengths:
        ax.annotate(f"{e2e[str(L)]['ratio_median']:.2f}x", (L, e2e[str(L)]["disaggregated"]["e2e_s"]["median"] * 1e3),
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("ms (median; band: min..max)")
    ax.set_title(f"end to end, {report['config']['max_tokens']} output tokens (labels: disagg / coloc)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1]
    kv = report["kv_transfer"]["by_length"]
    klen = list(kv)
    x = np.arange(len(klen))
    w = 0.27
    kv_b = [kv[L]["kv_bps"] / 1e6 for L in klen]
    rd_b = [kv[L]["http_read_bps"] / 1e6 for L in klen]
    so_b = [kv[L]["socket_bps"] / 1e6 for L in klen]
    ax.bar(x - w, kv_b, w, label="KV pull (HTTP, checked, copied into a cache)", color="#dd8452")
    ax.bar(x, rd_b, w, label="same stream, only read", color="#e8b48f")
    ax.bar(x + w, so_b, w, label="raw loopback socket copy", color="#999999")
    for i, L in enumerate(klen):
        ax.annotate(f"{kv[L]['ratio'] * 100:.0f}%", (x[i] - w, kv_b[i]), ha="center", va="bottom", fontsize=8)
        ax.annotate(f"{kv[L]['http_read_ratio'] * 100:.0f}%", (x[i], rd_b[i]), ha="center", va="bottom",
                    fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(top=max(so_b + kv_b + rd_b) * 5)  # room for the legend above the bars
    ax.set_xticks(x, [f"{L}\n({kv[L]['bytes'] / 2**20:.0f} MiB)" for L in klen])
    ax.set_xlabel("prompt tokens (KV stream size)")
    ax.set_ylabel("MB/s (median of trials)")
    ax.set_title("KV transfer vs socket copy of the same bytes (labels: share of socket)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left")
    cfg = report["config"]
    finish(fig, path, f"fleetwise bench pd: {cfg['model_name']} ({cfg['device']}, {cfg['cpu_count']} CPUs), "
                      f"{cfg['repeats']} request(s) per length and mode")


# -- pd-load (load_run.py) ------------------------------------------------------------------------

SYSTEMS = ("disaggregated", "colocated")
COLOC_TBT_BLOWUP = 2.0    # the target applies where the mixed pair's TBT p99 passes this times its idle p99
LOAD_TARGET = Target(AT_MOST, 1.3, "1P+1D TBT p99 / its idle TBT p99, where 2 mixed workers' passes 2x theirs",
                     "<= 1.3")


def load_verdict(result: dict) -> dict:
    """Each load: both systems' TBT p99 over their idle p99; whether the target applies and holds."""
    idle = {s: result["idle"][s]["tbt_p99_s"] for s in SYSTEMS}
    rows = []
    for d, c in zip(result["points"]["disaggregated"], result["points"]["colocated"]):
        dr = d["tbt_p99_s"] / idle["disaggregated"] if d["tbt_p99_s"] and idle["disaggregated"] else None
        cr = c["tbt_p99_s"] / idle["colocated"] if c["tbt_p99_s"] and idle["colocated"] else None
        applies = cr is not None and cr > COLOC_TBT_BLOWUP
        rows.append({"load_multiple": d["load_multiple"], "offered_rate": d["offered_rate"],
                     "disaggregated_tbt_p99_over_idle": dr, "colocated_tbt_p99_over_idle": cr,
                     "target_applies": applies, "met": LOAD_TARGET.met(dr) if applies else None})
    applied = [r["met"] for r in rows if r["target_applies"]]
    return {"by_load": rows, "met": all(applied) if applied and None not in applied else None}


def load_targets() -> dict:
    return {"colocated_tbt_p99_over_idle_where_target_applies": {"op": ">", "value": COLOC_TBT_BLOWUP},
            "disaggregated_tbt_p99_over_idle": LOAD_TARGET.to_json()}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:7.0f} ms"


def print_load(console: Console, report: dict) -> None:
    t = Table(title="TBT and TTFT under the same load; x idle: TBT p99 over the system's idle TBT p99; "
                    "TBT p99 2nd+: the gaps after the second token (the handoff's gap left out)")
    for col in ("load", "req/s", "system", "TBT p50", "TBT p99", "x idle", "TBT p99 2nd+", "TTFT p50",
                "TTFT p99", "done", "target"):
        t.add_column(col, justify="right")
    for s in SYSTEMS:
        p = report["idle"][s]
        t.add_row("idle", "-", s, _ms(p["tbt_p50_s"]), _ms(p["tbt_p99_s"]), "1", _ms(p["tbt_after_first_p99_s"]),
                  _ms(p["ttft_p50_s"]), _ms(p["ttft_p99_s"]), f"{p['completed']}/{p['requests']}", "")
    for i, v in enumerate(report["verdict"]["by_load"]):
        for s in SYSTEMS:
            p = report["points"][s][i]
            ratio = v[f"{s}_tbt_p99_over_idle"]
            t.add_row(f"x{v['load_multiple']}", f"{v['offered_rate']:.2f}", s, _ms(p["tbt_p50_s"]),
                      _ms(p["tbt_p99_s"]), "-" if ratio is None else f"{ratio:.2f}",
                      _ms(p["tbt_after_first_p99_s"]), _ms(p["ttft_p50_s"]), _ms(p["ttft_p99_s"]),
                      f"{p['completed']}/{p['requests']}",
                      mark(v["met"]) if s == "disaggregated" and v["target_applies"] else "")
    console.print(t)
    for note in report.get("notes", []):
        console.print(f"note: {note}")


def plot_load(report: dict, path: Path) -> None:
    fig, axes = figure(2, (13, 4.8))
    colors = {"disaggregated": "#dd8452", "colocated": "#4c72b0"}
    names = {"disaggregated": "1P+1D", "colocated": "2 mixed"}
    for ax, key, title in ((axes[0], "tbt", "TBT (every gap between two tokens)"), (axes[1], "ttft", "TTFT")):
        for s in SYSTEMS:
            pts = report["points"][s]
            x = [p["offered_rate"] for p in pts]
            for q, ls in (("p50", "--"), ("p99", "-")):
                y = [(p[f"{key}_{q}_s"] or np.nan) * 1e3 for p in pts]
                ax.plot(x, y, ls=ls, marker="o", color=colors[s], label=f"{names[s]} {q}")
            ax.axhline((report["idle"][s][f"{key}_p99_s"] or np.nan) * 1e3, color=colors[s], ls=":", lw=1,
                       label=f"{names[s]} idle p99")
        if key == "tbt":
            idle = report["idle"]["disaggregated"]["tbt_p99_s"] or np.nan
            ax.axhline(idle * LOAD_TARGET.value * 1e3, color="#dd8452", ls="-.", lw=1,
                       label=f"target: 1P+1D idle p99 x {LOAD_TARGET.value}")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s, Azure conversation arrivals scaled)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    cfg = report["config"]
    what = (f"modelled {cfg['modelled_forward']} on {cfg['modelled_gpu']}s per worker" if cfg["fleet"] == "modelled"
            else "each worker pinned to one core")
    finish(fig, path, f"fleetwise bench pd-load ({cfg['fleet']} fleet): 1 prefill + 1 decode vs 2 mixed workers, "
                      f"{what}; {cfg['requests']} requests per load, {cfg['cpu_count']} CPUs")
