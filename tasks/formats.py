"""Input formats: chat messages, the row formats of preference and demonstration data, and the renderings of a
dialogue (the data of InstructGPT §3.5: demonstrations, K-wise ranked comparisons, prompts).

Row formats: HH-RLHF transcripts (``chosen``/``rejected`` dialogues, Bai et al. 2022), ``prompt``/``chosen``/``rejected``
as strings or message lists, K-wise rankings (``responses`` best first, or ``completions`` + ``ranks`` with rank 1 =
best), OpenAI-style ``messages``, Alpaca ``instruction``/``input``/``output`` and the Alpaca / Self-Instruct seed-task
format. A row that cannot become a canonical row raises :class:`MalformedRow` with a short snake_case ``rule`` and a
detail that never contains the row's text (the HH-RLHF data is red-teaming text). Transcript turns are kept as written:
the few HH-RLHF dialogues with two assistant turns in a row keep both turns.

Renderings of a dialogue, each with one job (changing one changes data versions or metrics):
:func:`render_prompt_text` (the canonical key of a prompt: ids, split hashing, duplicates, token budgets),
:func:`transcript` (HH-style ``Human:``/``Assistant:`` text: PPO-ptx and perplexity texts) and :func:`last_user_turn`
(what a person reads as "the prompt" in sample tables). Models read prompts through the tokenizer's chat template
(:func:`rlhf_pipeline.models.tokens.chat_prompt_ids`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

COMPARISON_FORMATS = ("hh_rlhf", "prompt_chosen_rejected", "kwise")
DEMONSTRATION_FORMATS = ("messages", "alpaca", "seed_tasks")
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"human": "user", "user": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
                 "model": "assistant", "system": "system"}
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_ASSISTANT_MARK = "\n\nAssistant:"

class MalformedRow(ValueError):
    """One input row that cannot become a canonical row.

    Attributes:
        rule: short snake_case id of the failed rule (``empty_reply``, ``prompt_mismatch``, ``no_assistant_turn``,
            ``identical_responses``, ``not_a_string``, ``tied_ranks``, ...).
        detail: a description that never contains the row's text.
    """

    def __init__(self, rule: str, detail: str = "") -> None:
        super().__init__(f"{rule}: {detail}" if detail else rule)
        self.rule = rule
        self.detail = detail



@dataclass
class BadRow:
    """A row a reader could not decode (e.g. a line that is not JSON), yielded in its place so the gate reports it
    under its row number instead of failing the whole file."""

    rule: str
    detail: str



# ---------------------------------------------------------------------------------------------------------- renderings


def render_prompt_text(messages: list[dict]) -> str:
    """The canonical text of a message list: ``"<role>: <content>"`` per message joined by blank lines.

    Used for split hashing, ids, duplicate detection and token-length estimates; not a chat template. An empty list
    renders as ``""``.
    """
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)



def transcript(messages: list[dict], reply: str) -> str:
    """An HH-style transcript ``"Human: ...\n\nAssistant: ..."`` of ``messages`` (system turns left out) followed by
    the assistant's ``reply``: the text of PPO-ptx batches and of the alignment-tax perplexity."""
    turns = [f"{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages
             if m["role"] != "system"]
    return "\n\n".join(turns + [f"Assistant: {reply}"])


def last_user_turn(messages: list[dict]) -> str:
    """The content of the last user message (``""`` when there is none): the prompt as a person reads it."""
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    return ""


# ----------------------------------------------------------------------------------------------------------- messages


def parse_hh_dialogue(text: str) -> list[dict]:
    """Parse an HH-RLHF transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into chat messages.

    Returns ``[{"role": "user" | "assistant", "content": str}, ...]`` in order, contents stripped; turns are kept as
    written (two assistant turns in a row stay two messages). A ``Human:`` / ``Assistant:`` without the blank line
    before it is part of the content, as in the published data.

    Raises:
        MalformedRow: ``not_a_string`` when ``text`` is not a str; ``text_before_first_turn`` when non-blank text
            precedes the first turn marker; ``no_turns`` when there is no turn marker at all.
    """
    if not isinstance(text, str):
        raise MalformedRow("not_a_string", f"dialogue is {type(text).__name__}, expected str")
    parts = _HH_TURN.split(text)
    if len(parts) == 1:
        raise MalformedRow("no_turns", "no 'Human:' or 'Assistant:' turn marker")
    if parts[0].strip():
        raise MalformedRow("text_before_first_turn", f"{len(parts[0].strip())} characters before the first turn")
    return [{"role": _HH_ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _check_prompt(prompt: list[dict]) -> list[dict]:
    if not prompt:
        raise MalformedRow("empty_prompt", "no turn before the final reply")
    for i, message in enumerate(prompt, 1):
        if not message["content"]:
            raise MalformedRow("empty_turn", f"prompt turn {i} of {len(prompt)} ({message['role']}) is empty")
    return prompt


def _check_responses(responses: list[str], names: list[str] | None = None) -> list[str]:
    names = names or [f"response {i + 1}" for i in range(len(responses))]
    for name, response in zip(names, responses):
        if not isinstance(response, str):
            raise MalformedRow("not_a_string", f"{name} is {type(response).__name__}, expected str")
        if not response.strip():
            raise MalformedRow("empty_reply", f"{name} is empty")
    stripped = [r.strip() for r in responses]
    if len(set(stripped)) < len(stripped):
        raise MalformedRow("identical_responses", "two of the ranked responses are the same text")
    return stripped


def split_hh_comparison(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """Split an HH-RLHF pair of transcripts into the shared prompt and the two final replies.

    The prompt is every turn before the final ``"\\n\\nAssistant:"``; it must be the same (turn by turn, after
    stripping) in both transcripts. Either argument may also be a message list (the last message is the reply).

    Returns:
        ``(prompt_messages, chosen_reply, rejected_reply)``, replies stripped.

    Raises:
        MalformedRow: ``not_a_string``, ``no_assistant_turn``, ``last_turn_not_assistant``, ``prompt_mismatch`` (the
            transcripts differ before their last reply), ``empty_prompt``, ``empty_turn``, ``empty_reply`` and
            ``identical_responses``.
    """
    prompts: list[list[dict]] = []
    replies: list[str] = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(text, list):
            messages = _normalize_messages(text, name)
            if not messages or messages[-1]["role"] != "assistant":
                raise MalformedRow("no_assistant_turn", f"{name} does not end with an assistant message")
            prompts.append(messages[:-1])
            replies.append(messages[-1]["content"])
            continue
        if not isinstance(text, str):
            raise MalformedRow("not_a_string", f"{name} is {type(text).__name__}, expected str")
        cut = text.rfind(_ASSISTANT_MARK)
        if cut < 0:
            if text.startswith("Assistant:"):
                cut, mark = 0, len("Assistant:")
            else:
                raise MalformedRow("no_assistant_turn", f"{name} has no '\\n\\nAssistant:' turn")
        else:
            mark = len(_ASSISTANT_MARK)
        reply = text[cut + mark:]
        if "\n\nHuman:" in reply:
            raise MalformedRow("last_turn_not_assistant", f"{name} ends with a human turn")
        prefix = text[:cut]
        prompts.append(parse_hh_dialogue(prefix) if prefix.strip() else [])
        replies.append(reply.strip())
    if prompts[0] != prompts[1]:
        a, b = prompts
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise MalformedRow(
            "prompt_mismatch",
            f"chosen and rejected differ before their final reply: prompt turns {len(a)} vs {len(b)}, "
            f"first difference at turn {first + 1}",
        )
    prompt = _check_prompt(prompts[0])
    chosen_reply, rejected_reply = _check_responses(replies, ["chosen reply", "rejected reply"])
    return prompt, chosen_reply, rejected_reply


def _normalize_messages(value: Any, name: str = "messages") -> list[dict]:
    if isinstance(value, tuple):
        value = list(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if not isinstance(value, list):
        raise MalformedRow("bad_messages", f"{name} is {type(value).__name__}, expected a list of messages")
    out = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise MalformedRow("bad_messages", f"{name}[{i}] is {type(message).__name__}, expected an object")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        role = _ROLE_ALIASES.get(str(role).lower()) if role is not None else None
        if role is None:
            raise MalformedRow("bad_messages", f"{name}[{i}] has no known role ({', '.join(ROLES)})")
        if not isinstance(content, str):
            raise MalformedRow("not_a_string", f"{name}[{i}].content is {type(content).__name__}, expected str")
        out.append({"role": role, "content": content.strip()})
    return out


def _prompt_from_value(value: Any, name: str = "prompt") -> list[dict]:
    """A prompt given as a plain string, an HH transcript string or a message list -> messages."""
    if isinstance(value, str):
        if value.lstrip().startswith("Human:"):
            messages = parse_hh_dialogue(value)
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages = messages[:-1]  # "...\n\nAssistant:" with the reply left open
            return messages
        return [{"role": "user", "content": value.strip()}]
    if value is None:
        raise MalformedRow("missing_field", f"'{name}' is missing")
    return _normalize_messages(value, name)


def _response_from_value(value: Any, name: str) -> str:
    """A response given as a string, a message dict or a message list ending with the assistant's reply."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if value is None:
        raise MalformedRow("missing_field", f"'{name}' is missing")
    messages = _normalize_messages(value, name)
    if not messages or messages[-1]["role"] != "assistant":
        raise MalformedRow("no_assistant_turn", f"{name} does not end with an assistant message")
    return messages[-1]["content"]


# -------------------------------------------------------------------------------------------------------- row formats


def _require(row: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise MalformedRow("missing_field", f"missing {', '.join(repr(k) for k in missing)}")


def _comparison_hh(row: dict) -> tuple[list[dict], list[str]]:
    _require(row, "chosen", "rejected")
    prompt, chosen, rejected = split_hh_comparison(listify(row["chosen"]), listify(row["rejected"]))
    return prompt, [chosen, rejected]


def _comparison_pcr(row: dict) -> tuple[list[dict], list[str]]:
    _require(row, "prompt", "chosen", "rejected")
    prompt = _check_prompt(_prompt_from_value(listify(row["prompt"])))
    responses = [_response_from_value(listify(row[k]), k) for k in ("chosen", "rejected")]
    return prompt, _check_responses(responses, ["chosen", "rejected"])


def _comparison_kwise(row: dict) -> tuple[list[dict], list[str]]:
    _require(row, "prompt")
    prompt = _check_prompt(_prompt_from_value(listify(row["prompt"])))
    if row.get("responses") is not None:
        responses = listify(row["responses"])
        if not isinstance(responses, list):
            raise MalformedRow("bad_ranking", "'responses' is not a list")
    else:
        _require(row, "completions", "ranks")
        completions, ranks = listify(row["completions"]), listify(row["ranks"])
        if not isinstance(completions, list) or not isinstance(ranks, list):
            raise MalformedRow("bad_ranking", "'completions' and 'ranks' must be lists")
        if len(completions) != len(ranks):
            raise MalformedRow("ranks_mismatch", f"{len(completions)} completions but {len(ranks)} ranks")
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranks):
            raise MalformedRow("bad_ranking", "ranks must be numbers (1 = best)")
        if len(set(ranks)) < len(ranks):
            raise MalformedRow("tied_ranks", f"ranks {sorted(ranks)} contain ties")
        responses = [c for _, c in sorted(zip(ranks, completions), key=lambda pair: pair[0])]
    if len(responses) < 2:
        raise MalformedRow("too_few_responses", f"{len(responses)} responses, need at least 2")
    responses = [_response_from_value(listify(r), f"response {i + 1}") for i, r in enumerate(responses)]
    return prompt, _check_responses(responses)


def _demonstration_messages(row: dict) -> tuple[list[dict], str]:
    _require(row, "messages")
    messages = _normalize_messages(listify(row["messages"]))
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise MalformedRow("no_assistant_turn", "no assistant message")
    if last < len(messages) - 1:  # never drop turns silently: the demonstration must end with the reply it teaches
        after = [m["role"] for m in messages[last + 1:]]
        raise MalformedRow("ends_after_reply", f"{len(after)} turn(s) ({', '.join(after)}) after the last assistant "
                                               "reply; a demonstration must end with the assistant's reply")
    prompt = _check_prompt(messages[:last])
    return prompt, _check_responses([messages[last]["content"]], ["assistant reply"])[0]


def _instruction_prompt(instruction: Any, extra: Any) -> list[dict]:
    if not isinstance(instruction, str):
        raise MalformedRow("not_a_string", f"instruction is {type(instruction).__name__}, expected str")
    if extra is not None and not isinstance(extra, str):
        raise MalformedRow("not_a_string", f"input is {type(extra).__name__}, expected str")
    text = instruction.strip()
    if extra and extra.strip():
        text = f"{text}\n\n{extra.strip()}"
    if not instruction.strip():
        raise MalformedRow("empty_prompt", "instruction is empty")
    return [{"role": "user", "content": text}]


def _demonstration_alpaca(row: dict) -> tuple[list[dict], str]:
    _require(row, "instruction", "output")
    prompt = _instruction_prompt(row["instruction"], row.get("input"))
    return prompt, _check_responses([row["output"]], ["output"])[0]


def _demonstration_seed(row: dict) -> tuple[list[dict], str]:
    _require(row, "instruction", "instances")
    instances = listify(row["instances"])
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise MalformedRow("no_instance", "'instances' has no {input, output} object")
    first = instances[0]
    if first.get("output") is None:
        raise MalformedRow("missing_field", "instances[0] has no 'output'")
    prompt = _instruction_prompt(row["instruction"], first.get("input"))
    return prompt, _check_responses([first["output"]], ["instances[0].output"])[0]


PARSERS = {
    "hh_rlhf": _comparison_hh,
    "prompt_chosen_rejected": _comparison_pcr,
    "kwise": _comparison_kwise,
    "messages": _demonstration_messages,
    "alpaca": _demonstration_alpaca,
    "seed_tasks": _demonstration_seed,
}


def listify(value: Any) -> Any:
    """numpy arrays (Parquet / Arrow list columns read through pandas) -> python lists, recursively for dicts."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [listify(v) for v in value]
    if isinstance(value, dict):
        return {k: listify(v) for k, v in value.items()}
    return value


def structure_warnings(prompt: list[dict]) -> list[tuple[str, str]]:
    """Dialogue structure that parses but is unusual, as ``(rule, detail)`` pairs (empty when the prompt alternates
    user/assistant turns starting with the user; system turns are not counted):

    - ``starts_with_assistant``: the first non-system turn is the assistant's;
    - ``repeated_role``: two consecutive turns of the same role (the HH-RLHF data has a few with two assistant turns).

    The gate keeps such rows with a report and refuses them under ``--strict`` / ``data.invalid_rows: fail``.
    """
    turns = [(i, m["role"]) for i, m in enumerate(prompt, 1) if m["role"] != "system"]
    found = []
    if turns and turns[0][1] == "assistant":
        found.append(("starts_with_assistant", f"turn {turns[0][0]} (the first) is the assistant's"))
    repeats = [f"{a[0]} and {b[0]} ({a[1]})" for a, b in zip(turns, turns[1:]) if a[1] == b[1]]
    if repeats:
        found.append(("repeated_role", "consecutive turns of one role: " + ", ".join(repeats)))
    return found


def detect_format(row: Any) -> str:
    """The input format of a row from its keys (used for ``format: auto``; the first row decides for a file).

    Raises:
        MalformedRow: ``unknown_format`` when the keys match no supported format.
    """
    if not isinstance(row, dict):
        if isinstance(row, BadRow):  # e.g. a line that is not JSON
            raise MalformedRow(row.rule, row.detail)
        raise MalformedRow("not_an_object", f"row is {type(row).__name__}, expected an object")
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if "responses" in keys or {"completions", "ranks"} <= keys:
        return "kwise"
    if {"chosen", "rejected"} <= keys:
        return "prompt_chosen_rejected" if "prompt" in keys else "hh_rlhf"
    if {"instruction", "instances"} <= keys:
        return "seed_tasks"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    raise MalformedRow("unknown_format", f"keys {sorted(keys)} match no supported format")
