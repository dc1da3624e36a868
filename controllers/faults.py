"""Finding the odd worker out, after C4: workers that should behave alike (one pool: same
model, role and GPU product, under one load balancer) are compared with each other window by
window, and one that stays out for several windows is an incident; then remediation within the
`FaultPolicy`'s limits. Pure: the caller measures, this module decides.

Scoring: each member's load-normalised signal (for example step seconds per token computed,
so a busy worker is not taken for a slow one) against its group's median, in units of the
group's median absolute deviation (scaled by 1.4826, so that it estimates a standard deviation
for normal data). Two floors keep a window whose few members happen to lie close together from
turning ordinary noise into huge scores: `MIN_SPREAD` of the median, and the group's typical
spread, the median of its last `HISTORY` windows' spreads (each relative to its median). On a
shared machine healthy peers differ by 2-3x in one window and four of them may agree to a few
percent in the next; a member is judged against how far apart its group usually is, not
against one lucky window. Only slowness counts (a positive score). A
group smaller than `minPeers` cannot outvote one member: each member is compared with its
own last `HISTORY` windows instead. A member is suspect after `consecutiveWindows` windows
out in a row: each of them at least half the threshold out, and on average the threshold (a
1.3x slow device in a group of four scores about the threshold, so one window that a noisy
peer pulls under it must not reset the count; a transient needs more than one window); a hard
signal (an XID error, a double-bit ECC error, a stalled engine) makes it
suspect at once.

Localisation: suspects on one node that are at least half of that node's members -> the node;
KV transfer times scored over every (sender, receiver) pair seen: a sender out on all its
pairs (at least two) -> the sender, a receiver likewise, a single pair -> the link between
them, which is routed around and whose workers are kept. Transfer times are scored on a log
scale against the matrix's typical spread (a pull's time on a busy receiver varies several
fold; a bad link is ten times slower or more), and a single pair, which carries few transfers
in a window, must stay out `consecutiveWindows` windows in a row, as a worker must; a whole
row or column is several pairs agreeing and acts at once.

Remediation: Quarantine, then RestartPod (a replacement placed away from the suspect node),
for a worker; CordonNode for a node; RouteAround for a link: the router pairs the two workers
with others until the action's `until`, `cooldownSeconds` (at least two windows) on, when the
link carries traffic again and is judged afresh. RouteAround evicts nobody, so it takes no share
of `maxUnavailableFraction` and no place in `maxActionsPerHour` (a burst of slow links must not
use up what a sick worker needs), is never held as flapping (a link still slow when its avoidance
lapses is found again, not flapping), and is not taken again while it is in force; like every
verb it is taken only when the policy's `actions` list it (the default list does). Limits, in this order: the
policy's allowed actions; `cooldownSeconds` per target; `maxActionsPerHour`; and never more
than `maxUnavailableFraction` of a group out at once, rounded down (4 peers at 0.25: one; 3
peers at 0.25: none). A target that comes back as an incident `FLAP_LIMIT` times within an hour
(each time after a window without it) is not acted on any more: the decision says so, for a
Degraded condition, instead of flapping.
"""

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from fleetwise.spec import FaultPolicySpec

MIN_SPREAD = 0.02   # of the median: the least spread a group is taken to have
HISTORY = 20        # windows of a member's own history, for groups too small to compare
FLAP_LIMIT = 3      # incidents on one target within an hour before the detector stops acting on it
HOUR = 3600.0
LINKS = "kv links"  # the spreads' key of the KV transfer matrix


@dataclass(frozen=True)
class Member:
    """One worker's signal in one window."""
    name: str
    group: str                  # its peers: e.g. "namespace/deployment/role/gpu product"
    node: str | None
    value: float | None         # load-normalised, larger is worse; None: no data this window
    hard: str | None = None     # a hard signal's description; acts at once
    unavailable: bool = False   # already quarantined or draining


@dataclass(frozen=True)
class Transfer:
    """KV transfer seconds per byte between two workers in one window."""
    sender: str
    receiver: str
    seconds_per_byte: float


@dataclass
class Incident:
    kind: str                    # worker | node | link
    target: str                  # a worker, a node, or "sender->receiver"
    group: str
    evidence: dict


@dataclass(frozen=True)
class Action:
    verb: str                    # Quarantine | RestartPod | CordonNode | RouteAround
    target: str
    reason: str
    until: float | None = None   # RouteAround: when the avoidance lapses (seconds since the epoch)


def avoidance_seconds(policy: FaultPolicySpec) -> float:
    """How long a slow link is routed around before it is tried again."""
    return float(max(policy.remediation.cooldown_seconds, 2 * policy.detection.window_seconds))


@dataclass
class FaultState:
    streak: dict[str, int] = field(default_factory=dict)
    recent: dict[str, deque] = field(default_factory=dict)           # member -> its scores in its current streak
    history: dict[str, deque] = field(default_factory=dict)
    acted: dict[str, float] = field(default_factory=dict)            # target -> last action time
    actions: deque = field(default_factory=deque)                     # times of actions, for the hourly bound
    episodes: dict[str, deque] = field(default_factory=dict)          # target -> times it became an incident
    last_seen: dict[str, float] = field(default_factory=dict)         # target -> last window it was one
    spreads: dict[str, deque] = field(default_factory=dict)           # group -> its last windows' relative spreads


@dataclass
class FaultDecision:
    incidents: list[Incident]
    actions: list[Action]
    held: list[tuple[str, str]]          # (target, why no action)
    flapping: list[str]                  # targets the detector no longer acts on
    scores: dict[str, float]


def robust_scores(values: dict[str, float], typical: float = 0.0) -> dict[str, float]:
    """Each value's distance above the median, in robust standard deviations; the spread is at
    least `MIN_SPREAD` and `typical` (a spread relative to the median) of the median."""
    median = statistics.median(values.values())
    mad = statistics.median(abs(v - median) for v in values.values())
    spread = max(1.4826 * mad, max(MIN_SPREAD, typical) * abs(median), 1e-12)
    return {k: (v - median) / spread for k, v in values.items()}


def log_scores(values: dict[str, float], typical: float = 0.0) -> tuple[dict[str, float], float]:
    """Robust scores of the values' logarithms (a value k times the median is as far out as one
    1/k of it), and their spread, 1.4826 MAD of the logs (about the relative spread); the
    spread used is at least `MIN_SPREAD` and `typical`."""
    logs = {k: math.log(max(v, 1e-300)) for k, v in values.items()}
    median = statistics.median(logs.values())
    spread = 1.4826 * statistics.median(abs(v - median) for v in logs.values())
    return {k: (v - median) / max(spread, MIN_SPREAD, typical) for k, v in logs.items()}, spread


def relative_spread(values: dict[str, float]) -> float:
    """1.4826 MAD over the median: how far apart the values are, as a share of their median."""
    median = statistics.median(values.values())
    mad = statistics.median(abs(v - median) for v in values.values())
    return 1.4826 * mad / abs(median) if median else 0.0


def _group_scores(name: str, group: list[Member], state: FaultState) -> dict[str, float]:
    """Scores against the group, its typical spread (over `HISTORY` windows) as a floor."""
    values = {m.name: float(m.value or 0.0) for m in group}
    past = state.spreads.setdefault(name, deque(maxlen=HISTORY))
    typical = statistics.median(past) if len(past) >= 3 else 0.0
    past.append(relative_spread(values))
    return robust_scores(values, typical)


def _score(members: list[Member], policy: FaultPolicySpec, state: FaultState) -> dict[str, float]:
    scores: dict[str, float] = {}
    groups: dict[str, list[Member]] = {}
    for m in members:
        if m.value is not None and not m.unavailable:
            groups.setdefault(m.group, []).append(m)
    for name, group in groups.items():
        if len(group) >= policy.detection.min_peers:
            scores.update(_group_scores(name, group, state))
            continue
        for m in group:  # too few peers: against its own history
            past = state.history.get(m.name)
            if past is not None and len(past) >= policy.detection.min_peers and m.value is not None:
                own = {str(i): float(v) for i, v in enumerate(past)} | {"now": float(m.value)}
                scores[m.name] = robust_scores(own)["now"]
    for m in members:
        if m.value is not None:
            state.history.setdefault(m.name, deque(maxlen=HISTORY)).append(m.value)
    return scores


def _suspects(members: list[Member], scores: dict[str, float], policy: FaultPolicySpec,
              state: FaultState) -> dict[str, dict]:
    """Members out long enough (`consecutiveWindows` windows, each at least half the threshold
    out, on average the threshold), or with a hard signal, with their evidence."""
    windows, threshold = policy.detection.consecutive_windows, policy.detection.deviation_threshold
    out: dict[str, dict] = {}
    for m in members:
        score = scores.get(m.name)
        if score is not None and score > threshold / 2:
            state.streak[m.name] = state.streak.get(m.name, 0) + 1
            state.recent.setdefault(m.name, deque(maxlen=windows)).append(score)
        else:
            state.streak.pop(m.name, None)
            state.recent.pop(m.name, None)
        recent = state.recent.get(m.name, ())
        persistent = len(recent) == windows and statistics.fmean(recent) > threshold
        hard = m.hard if (m.hard and policy.detection.xid_errors) else None
        if hard or persistent:
            out[m.name] = {"score": score, "value": m.value, "windows_out": state.streak.get(m.name, 0),
                           "hard": hard}
    return out


def _localise(members: list[Member], suspects: dict[str, dict]) -> list[Incident]:
    by_node: dict[str, list[Member]] = {}
    for m in members:
        if m.node:
            by_node.setdefault(m.node, []).append(m)
    incidents: list[Incident] = []
    taken: set[str] = set()
    for node, on_node in sorted(by_node.items()):
        bad = [m for m in on_node if m.name in suspects]
        if len(bad) >= 2 and 2 * len(bad) >= len(on_node):
            incidents.append(Incident("node", node, "", {m.name: suspects[m.name] for m in bad}))
            taken.update(m.name for m in bad)
    group_of = {m.name: m.group for m in members}
    for name, evidence in sorted(suspects.items()):
        if name not in taken:
            incidents.append(Incident("worker", name, group_of.get(name, ""), evidence))
    return incidents


def localise_links(transfers: list[Transfer], threshold: float, typical: float = 0.0) -> list[Incident]:
    """Slow KV transfers: a whole row (sender) or column (receiver) of at least two pairs, else
    single pairs (links). Scored on a log scale, the spread at least `typical` (`log_scores`)."""
    if len(transfers) < 3:
        return []
    scores, _ = log_scores({f"{t.sender}->{t.receiver}": t.seconds_per_byte for t in transfers}, typical)
    slow = {k for k, s in scores.items() if s > threshold}
    incidents = []
    for end, position in (("sender", 0), ("receiver", 1)):
        pairs: dict[str, list[str]] = {}
        for key in scores:
            pairs.setdefault(key.split("->")[position], []).append(key)
        for worker, keys in sorted(pairs.items()):
            if len(keys) >= 2 and all(k in slow for k in keys):
                incidents.append(Incident("worker", worker, "", {"kv_" + end: {k: scores[k] for k in keys}}))
                slow -= set(keys)
    incidents += [Incident("link", key, "", {"score": scores[key]}) for key in sorted(slow)]
    return incidents


def detect(members: list[Member], transfers: list[Transfer], policy: FaultPolicySpec, state: FaultState,
           now: float) -> FaultDecision:
    scores = _score(members, policy, state)
    incidents = _localise(members, _suspects(members, scores, policy, state))
    past = state.spreads.setdefault(LINKS, deque(maxlen=HISTORY))
    typical = statistics.median(past) if len(past) >= 3 else 0.0
    links = localise_links(transfers, policy.detection.deviation_threshold, typical)
    if len(transfers) >= 3:
        past.append(log_scores({f"{t.sender}->{t.receiver}": t.seconds_per_byte for t in transfers})[1])
    incidents += _persistent(links, policy, state)
    actions, held, flapping = _remediate(incidents, members, policy, state, now)
    return FaultDecision(incidents, actions, held, flapping, scores)


def _persistent(incidents: list[Incident], policy: FaultPolicySpec, state: FaultState) -> list[Incident]:
    """Single links out `consecutiveWindows` windows in a row; rows and columns as they are."""
    out, slow = [], set()
    for inc in incidents:
        if inc.kind != "link":
            out.append(inc)
            continue
        key = f"link {inc.target}"
        slow.add(key)
        state.streak[key] = state.streak.get(key, 0) + 1
        if state.streak[key] >= policy.detection.consecutive_windows:
            out.append(Incident(inc.kind, inc.target, inc.group, {**inc.evidence, "windows_out": state.streak[key]}))
    for key in [k for k in state.streak if k.startswith("link ") and k not in slow]:
        del state.streak[key]
    return out


def _remediate(incidents: list[Incident], members: list[Member], policy: FaultPolicySpec, state: FaultState,
               now: float) -> tuple[list[Action], list[tuple[str, str]], list[str]]:
    allowed: set[str] = set(policy.remediation.actions)
    group_size: dict[str, int] = {}
    unavailable: dict[str, int] = {}
    for m in members:
        group_size[m.group] = group_size.get(m.group, 0) + 1
        unavailable[m.group] = unavailable.get(m.group, 0) + m.unavailable
    while state.actions and now - state.actions[0] > HOUR:
        state.actions.popleft()
    actions: list[Action] = []
    held: list[tuple[str, str]] = []
    flapping: list[str] = []
    for inc in incidents:
        episodes = state.episodes.setdefault(inc.target, deque())
        last = state.last_seen.get(inc.target)
        if last is None or now - last > 1.5 * policy.detection.window_seconds:  # back after a window without it
            episodes.append(now)
        state.last_seen[inc.target] = now
        while episodes and now - episodes[0] > HOUR:
            episodes.popleft()
        if inc.kind == "link":
            actions += _route_around(inc, allowed, policy, state, now, held)
            continue
        why = _why_not(inc, allowed, policy, state, now, group_size, unavailable)
        if len(episodes) >= FLAP_LIMIT:
            flapping.append(inc.target)
            why = f"back {len(episodes)} times within an hour: no more actions on it until a person looks"
        if why:
            held.append((inc.target, why))
            continue
        verbs = _verbs(inc, allowed)
        reason = f"{inc.kind} {inc.target} out of its peers: {inc.evidence}"[:1000]
        actions += [Action(verb, inc.target, reason) for verb in verbs]
        state.acted[inc.target] = now
        state.actions.append(now)
        if inc.group:
            unavailable[inc.group] = unavailable.get(inc.group, 0) + 1
    return actions, held, flapping


def _route_around(inc: Incident, allowed: set[str], policy: FaultPolicySpec, state: FaultState, now: float,
                  held: list[tuple[str, str]]) -> list[Action]:
    """RouteAround for a slow link, unless one is in force or the policy does not list it."""
    if not allowed:
        held.append((inc.target, "the FaultPolicy allows no actions (detection only)"))
        return []
    if "RouteAround" not in allowed:
        listed = ", ".join(sorted(allowed))
        held.append((inc.target, f"the FaultPolicy does not allow RouteAround (its actions: {listed})"))
        return []
    last = state.acted.get(inc.target)
    if last is not None and now - last < avoidance_seconds(policy):
        return []  # routed around already: the pair's last transfers may still be in the window
    state.acted[inc.target] = now
    reason = f"link {inc.target} out of its peers: {inc.evidence}"[:1000]
    return [Action("RouteAround", inc.target, reason, until=now + avoidance_seconds(policy))]


def _verbs(inc: Incident, allowed: set[str]) -> list[str]:
    if inc.kind == "node":
        return ["CordonNode"] if "CordonNode" in allowed else []
    return [v for v in ("Quarantine", "RestartPod") if v in allowed]


def _why_not(inc: Incident, allowed: set[str], policy: FaultPolicySpec, state: FaultState, now: float,
             group_size: dict[str, int], unavailable: dict[str, int]) -> str | None:
    """Why a worker or node incident gets no action now, or None."""
    if not set(_verbs(inc, allowed)):
        return f"the FaultPolicy allows none of the actions for a {inc.kind} ({', '.join(sorted(allowed)) or 'none'})"
    last = state.acted.get(inc.target)
    if last is not None and now - last < policy.remediation.cooldown_seconds:
        return f"acted on {now - last:.0f} s ago; cooldown {policy.remediation.cooldown_seconds} s"
    if len(state.actions) >= policy.remediation.max_actions_per_hour:
        return f"{len(state.actions)} actions in the last hour, the FaultPolicy's limit"
    if inc.kind == "worker" and inc.group:
        size = group_size.get(inc.group, 0)
        budget = int(policy.remediation.max_unavailable_fraction * size)  # rounded down
        if unavailable.get(inc.group, 0) + 1 > budget:
            return (f"{unavailable.get(inc.group, 0)} of {size} in {inc.group} already unavailable; "
                    f"maxUnavailableFraction {policy.remediation.max_unavailable_fraction} allows {budget}")
    return None
