"""A generative model of how judges write when they drift from the asked format, for fuzzing the parser.

`compose(rng, n)` builds one judge answer from independent style dimensions, each drawn on its own:
naming scheme, order of the texts in the answer, rating notation, layout (blocks, one line per text,
bullets, tables, JSON shapes), rationale placement (with traps that mention another text's rating),
wrappers (preambles, fences, closing remarks), reasoning drafts with other provisional numbers, and
truncation. Every answer carries its ground truth per text (the rating a careful reader sees, or None
when the answer does not rate that text) and an `ambiguous` mark per text where a careful reader
could not tell (unnamed items out of order, a text cut off mid-verdict). The shapes come from judges'
habits, not from what the parser reads: many are meant to be unreadable.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

LABELS = {1: "Irrelevant", 2: "Partial Focus", 3: "Partial Compliance", 4: "Almost There", 5: "Comprehensive Compliance"}
ROMAN = ["I", "II", "III", "IV", "V", "VI"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth"]
NOUNS = ["Text", "Response", "Output", "Answer", "Completion", "Generation"]

NAMINGS = ["number", "noun_number", "letter", "letter_paren", "roman", "ordinal", "xml_id", "xml_attr", "unnamed"]
ORDERS = ["asked", "reverse", "best_first", "random"]
NOTATIONS = ["plain", "slash", "out_of", "stars", "double_bracket", "bold", "decimal", "with_label", "label", "points",
             "ten_scale"]
LAYOUTS = ["blocks", "one_line", "bullets", "table", "json_dict", "json_list", "json_nested", "xml", "prose",
           "heading_sentence", "json_scores"]
SUMMARIES = ["none", "none", "ranking_line", "best_named"]
RATIONALES = ["none", "before", "after", "trap"]
WRAPPERS = ["none", "preamble", "fence", "closing", "preamble_and_closing"]
REASONINGS = ["none", "think_tag", "thinking_tag", "prose_draft_final", "unclosed_think", "final_omits_one"]
TRUNCATIONS = ["none", "none", "none", "cut"]
DIMENSIONS = ("naming", "order", "notation", "layout", "rationale", "wrapper", "reasoning", "truncation", "summary")


@dataclass
class Composed:
    text: str
    n: int
    truth: list[int | None]  # what a careful reader sees for each text; None: the answer does not rate it
    ambiguous: list[bool]  # a careful reader could not tell
    dims: dict[str, str] = field(default_factory=dict)


def _name(scheme: str, k: int, noun: str) -> str:
    return {
        "number": f"Text {k}",
        "noun_number": f"{noun} {k}",
        "letter": f"{noun} {chr(64 + k)}",
        "letter_paren": f"({chr(96 + k)})",
        "roman": f"{noun} {ROMAN[k - 1]}",
        "ordinal": f"The {ORDINALS[k - 1]} {noun.lower()}",
        "xml_id": f"{noun} {k}",
        "xml_attr": f"{noun} {k}",
    }.get(scheme, "")


def _json_key(scheme: str, k: int, noun: str) -> str:
    return {"number": f"text_{k}", "noun_number": f"{noun} {k}", "letter": chr(64 + k), "letter_paren": chr(64 + k),
            "roman": ROMAN[k - 1], "ordinal": f"{noun} {k}"}.get(scheme, f"{noun.lower()}_{k}")


def _notation(style: str, r: int) -> str:
    return {
        "plain": str(r), "slash": f"{r}/5", "out_of": f"{r} out of 5", "stars": "\u2605" * r + "\u2606" * (5 - r),
        "double_bracket": f"[[{r}]]", "bold": f"**{r}**", "decimal": f"{r}.0", "with_label": f"{r} ({LABELS[r]})",
        "label": LABELS[r], "points": f"{r}/5 points", "ten_scale": f"{2 * r}/10",
    }[style]


def _rationale(rng: random.Random, placement: str, k: int, others: list[tuple[str, int]]) -> str:
    base = rng.choice(["It follows the instruction closely.", "It misses the requested format.",
                       "Mostly on task, with a few slips.", "It ignores the length limit.", "Clear and complete."])
    if placement == "trap" and others:
        other, r = rng.choice(others)
        trap = rng.choice([f"Compared with {other} (rated {r}), it is weaker.", f"Unlike {other}, which gets a {r}, it drifts.",
                           f"{other} deserved its {r}/5; this one less so.", f"It is not as good as {other} (score: {r})."])
        return f"{base} {trap}"
    return base


def _order(rng: random.Random, style: str, ratings: list[int]) -> list[int]:
    ks = list(range(1, len(ratings) + 1))
    if style == "reverse":
        return ks[::-1]
    if style == "best_first":
        return sorted(ks, key=lambda k: (-ratings[k - 1], k))
    if style == "random":
        rng.shuffle(ks)
    return ks


def _text_body(rng: random.Random, d: dict[str, str], ratings: list[int], order: list[int], noun: str) -> str:
    n = len(ratings)
    named = d["naming"] != "unnamed"
    names = {k: _name(d["naming"], k, noun) for k in range(1, n + 1)}
    others = {k: [(names[j] if named else f"Text {j}", ratings[j - 1]) for j in order if j != k] for k in order}
    parts = []
    for pos, k in enumerate(order, start=1):
        value = _notation(d["notation"], ratings[k - 1])
        why = _rationale(rng, d["rationale"], k, others[k] if named else [])
        name = names[k]
        if d["layout"] in ("blocks", "xml") and d["naming"] in ("xml_id", "xml_attr") or d["layout"] == "xml":
            tag = f'<text id="{k}">' if d["naming"] != "xml_attr" else f'<evaluation text="{k}">'
            close = "</text>" if d["naming"] != "xml_attr" else "</evaluation>"
            if not named:
                tag, close = "<evaluation>", "</evaluation>"
            parts.append(f"{tag}\n<rating>{value}</rating>\n<rationale>{why}</rationale>\n{close}")
        elif d["layout"] == "blocks":
            head = f"### {name}" if named else f"### {pos}."
            body = [f"Rating: {value}"]
            if d["rationale"] == "before":
                body.insert(0, f"Rationale: {why}")
            elif d["rationale"] != "none":
                body.append(f"Rationale: {why}")
            parts.append("\n".join([head, *body]))
        elif d["layout"] == "one_line":
            lead = f"{name}: " if named else f"{pos}. "
            parts.append(f"{lead}{value} - {why}" if d["rationale"] != "none" else f"{lead}{value}")
        elif d["layout"] == "prose":
            lead = name if named else "This one"
            parts.append(f"{lead} {why.lower()} I would give it {value}." if d["rationale"] != "none" else f"I'd give {lead} a {value}.")
        elif d["layout"] == "heading_sentence":
            head = f"## Evaluation of {name}" if named else f"## Evaluation {pos}"
            parts.append(f"{head}\n\n{why} Overall, I rate it {value}.")
        elif d["layout"] == "bullets":
            lead = f"- **{name}:** " if named else "- "
            parts.append(f"{lead}{why} Rating: {value}" if d["rationale"] != "none" else f"{lead}Rating: {value}")
        else:  # table rows, assembled below
            parts.append(f"| {name if named else pos} | {value} | {why} |")
    d["_parts"] = parts  # type: ignore[assignment]  # for truncation: where each text's verdict lies
    if d["layout"] == "table":
        head = "| Text | Rating | Rationale |" if named else "| # | Rating | Rationale |"
        return "\n".join([head, "|---|---|---|", *parts])
    return "\n\n".join(parts)


def _json_body(d: dict[str, str], ratings: list[int], order: list[int], noun: str) -> str:
    def item(k: int) -> dict[str, object]:
        r = ratings[k - 1]
        value: object = r if d["notation"] in ("plain", "decimal") else _notation(d["notation"], r)
        if d["notation"] == "decimal":
            value = float(r)
        return {"rationale": "Reason given here.", "rating": value}

    named = d["naming"] != "unnamed"
    if d["layout"] == "json_scores":
        scores = {_json_key(d["naming"], k, noun): item(k)["rating"] for k in order} if named else [item(k)["rating"] for k in order]
        return json.dumps({"scores": scores} if named else scores)
    if d["layout"] == "json_list" or not named:
        items = [({"text": _json_key(d["naming"], k, noun) if d["naming"] not in ("number",) else k} if named else {}) | item(k)
                 for k in order]
        return json.dumps(items if d["layout"] != "json_nested" else {"evaluations": items}, indent=2)
    obj = {_json_key(d["naming"], k, noun): item(k) for k in order}
    return json.dumps(obj if d["layout"] == "json_dict" else {"ratings": obj}, indent=2)


def _draft(rng: random.Random, ratings: list[int], noun: str) -> str:
    lines = [f"Text {k} looks like maybe a {rng.choice([x for x in range(1, 6) if x != r])}." for k, r in enumerate(ratings, 1)]
    return "\n".join(lines)


def compose(rng: random.Random, n: int | None = None) -> Composed:
    n = n or rng.randint(2, 5)
    d = {"naming": rng.choice(NAMINGS), "order": rng.choice(ORDERS), "notation": rng.choice(NOTATIONS),
         "layout": rng.choice(LAYOUTS), "rationale": rng.choice(RATIONALES), "wrapper": rng.choice(WRAPPERS),
         "reasoning": rng.choice(REASONINGS), "truncation": rng.choice(TRUNCATIONS)}
    noun = rng.choice(NOUNS)
    ratings = [rng.randint(1, 5) for _ in range(n)]
    order = _order(rng, d["order"], ratings)
    d["summary"] = rng.choice(SUMMARIES)
    is_json = d["layout"].startswith("json")
    body = _json_body(d, ratings, order, noun) if is_json else _text_body(rng, d, ratings, order, noun)
    truth: list[int | None] = list(ratings) if d["notation"] != "ten_scale" else [None] * n  # another scale: unread
    ambiguous = [False] * n
    if d["summary"] != "none" and d["naming"] not in ("unnamed", "xml_id", "xml_attr"):
        best = sorted(range(1, n + 1), key=lambda k: -ratings[k - 1])
        line = (" > ".join(_name(d["naming"], k, noun) for k in best) if d["summary"] == "ranking_line"
                else f"{_name(d['naming'], best[0], noun)} is the strongest overall.")
        body += "\n\n" + ("Final ranking: " if d["summary"] == "ranking_line" else "") + line
    if d["naming"] == "unnamed" and order != sorted(order):
        ambiguous = [True] * n  # unnamed items out of the asked order: nobody can tell which is which
    if d["order"] == "best_first" and rng.random() < 0.5:
        body = "Ranked from best to worst:\n\n" + body
    if is_json and d["wrapper"] in ("fence", "preamble_and_closing"):
        body = f"```json\n{body}\n```"
    if d["wrapper"] in ("preamble", "preamble_and_closing"):
        body = rng.choice(["Here are my ratings.", "Sure! Below is my evaluation of each text.",
                           "I have read the instruction and every text carefully."]) + "\n\n" + body
    if d["wrapper"] in ("closing", "preamble_and_closing"):
        body += "\n\n" + rng.choice(["Overall, the texts vary in quality.", "Let me know if you need more detail."])
    body = _with_reasoning(rng, d, body, ratings, noun, truth, ambiguous, order)
    if d["truncation"] == "cut":
        body = _truncate(rng, body, d, ratings, order, truth, ambiguous)
    d.pop("_parts", None)
    return Composed(body, n, truth, ambiguous, d)


def _with_reasoning(rng: random.Random, d: dict[str, str], body: str, ratings: list[int], noun: str,
                    truth: list[int | None], ambiguous: list[bool], order: list[int]) -> str:
    draft = _draft(rng, ratings, noun)
    kind = d["reasoning"]
    if kind == "think_tag":
        return f"<think>\n{draft}\n</think>\n{body}"
    if kind == "thinking_tag":
        return f"<thinking>\nLet me weigh them.\n{draft}\n</thinking>\n\n{body}"
    if kind == "prose_draft_final":
        return f"Let me think about each text first.\n{draft}\nHmm, on reflection I will adjust.\n\nFinal answer:\n{body}"
    if kind == "unclosed_think":
        truth[:] = [None] * len(truth)  # no final answer at all
        return f"<think>\n{draft}\n{body}"
    if kind == "final_omits_one" and d["naming"] not in ("unnamed",) and not d["layout"].startswith("json"):
        left_out = order[-1]
        truth[left_out - 1] = None
        kept = body  # rebuild without the last text: re-render from scratch is simpler than cutting
        d2 = dict(d)
        body2 = _text_body(random.Random(0), d2, ratings, order[:-1], noun) if len(order) > 1 else ""
        kept = body2 or kept
        if not body2:
            truth[left_out - 1] = ratings[left_out - 1]
        return f"<think>\n{draft}\n</think>\n{kept}"
    d["reasoning"] = "none" if kind == "final_omits_one" else kind
    return body


def _truncate(rng: random.Random, body: str, d: dict[str, str], ratings: list[int], order: list[int],
              truth: list[int | None], ambiguous: list[bool]) -> str:
    """Cut the answer somewhere: texts whose verdict lies wholly before the cut stay readable, the one
    cut through is ambiguous, the ones after it are not rated by the answer."""
    cut = rng.randint(len(body) // 3, max(len(body) // 3, len(body) - 1))
    kept = body[:cut]
    spans = _verdict_spans(body, d, order)
    if d["naming"] == "unnamed" or spans is None:
        ambiguous[:] = [True] * len(truth)
        return kept
    for k, (start, end) in spans.items():
        if end <= cut:
            continue
        if start < cut:
            ambiguous[k - 1] = True
        else:
            truth[k - 1] = None
    return kept


def _verdict_spans(body: str, d: dict[str, str], order: list[int]) -> dict[int, tuple[int, int]] | None:
    """Where each text's verdict lies in the answer; None when that cannot be told from the layout."""
    parts = d.get("_parts")
    if isinstance(parts, list) and d["layout"] != "table":
        spans, pos = {}, 0
        for k, part in zip(order, parts):
            start = body.find(part, pos)
            if start < 0:
                return None
            spans[k] = (start, start + len(part))
            pos = start + len(part)
        return spans
    if d["layout"] in ("json_dict", "json_list", "json_nested"):
        spans, pos = {}, 0
        for k in order:
            at = body.find('"rating"', pos)
            close = body.find("}", at)
            if at < 0 or close < 0:
                return None
            spans[k] = (pos, close + 1)
            pos = close + 1
        return spans
    return None


def outcomes(composed: Composed, ratings: list[int | None] | None) -> list[str]:
    """Per text: correct | unread | misattributed | ambiguous (not scored) | crashed (ratings None)."""
    if ratings is None:
        return ["crashed"] * composed.n
    out = []
    for got, want, unsure in zip(ratings, composed.truth, composed.ambiguous):
        if unsure:
            out.append("ambiguous")
        elif got is None:
            out.append("unread" if want is not None else "correct")
        else:
            out.append("correct" if got == want else "misattributed")
    return out
