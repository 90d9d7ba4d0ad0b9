"""Turning (prompt, response) text into token ids and labels with an exact boundary.

An encoded example is a dict `{"input_ids": list[int], "labels": list[int]}` with labels -100 on
every prompt token and equal to `input_ids` on the response tokens (unshifted: the causal-LM loss
shifts them, so logits at t are scored against labels[t + 1]). The response ends with EOS.

Exact boundary: the prompt is tokenized alone, exactly as it will be at generation time. The
response tokens are the rest of the tokenization of prompt + response when that tokenization
starts with the prompt's tokens (the usual case: the response then reads as running text, e.g.
GPT-2's " France" is one token, "ĠFrance"). When a merge spans the boundary (the prompt's last
token would merge with the response's first character), the response is tokenized on its own and
appended instead, so the labels never start inside a prompt token; such examples are counted
as `boundary_retokenized`. Either way, training sees the same prompt tokens that generation
will be given.
"""

from __future__ import annotations

from collections.abc import Sequence

IGNORE_INDEX = -100


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer's post-processor puts in front of a text (e.g. BOS for Llama; none for
    GPT-2). Suffixes the post-processor would add (an automatic EOS) are not used: EOS is appended
    explicitly after the response."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without_special = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(without_special)
    if n and with_special[len(with_special) - n :] == without_special:
        return list(with_special[: len(with_special) - n])
    return []


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token: set tokenizer.eos_token (e.g. to its "
            "end-of-text token) so that responses can end and generation can stop"
        )
    return tokenizer.eos_token_id


def encode_pairs(
    tokenizer, prompts: Sequence[str], responses: Sequence[str], *, add_special_prefix: bool = True
) -> tuple[list[list[int]], list[list[int]], int]:
    """Token ids of each prompt and of each response (+ EOS), batched.

    Returns (prompt_ids, response_ids, retokenized) where `retokenized` counts the pairs whose
    boundary fell inside a token (see the module docstring). `add_special_prefix=False` for text
    rendered by a chat template, which already holds its BOS as text.
    """
    eos = eos_id(tokenizer)
    prefix = special_prefix(tokenizer) if add_special_prefix else []
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    full_ids = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=False)["input_ids"]
    out_prompts, out_responses, retokenized = [], [], 0
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
        if f[: len(p)] == p:
            r = f[len(p) :]
        else:
            r = tokenizer(responses[i], add_special_tokens=False)["input_ids"]
            retokenized += 1
        if eos in r:  # a chat template's end of turn: stop right after it
            r = r[: r.index(eos)]
        out_prompts.append(prefix + p)
        out_responses.append(r + [eos])
    return out_prompts, out_responses, retokenized


def join_example(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> dict[str, list[int]]:
    """One encoded example: loss on the response only."""
    return {
        "input_ids": list(prompt_ids) + list(response_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + list(response_ids),
    }


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat_prompt(tokenizer, messages: list[dict], response: str) -> tuple[str, str]:
    """(prompt text with the assistant turn opened, response text with the turn's end), from the
    tokenizer's chat template. The template must be prefix-stable: rendering the conversation with
    the answer must start with the rendering that opens the answer's turn."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], add_generation_prompt=False, tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError(
            "the tokenizer's chat template is not prefix-stable (the conversation with the assistant's reply "
            f"does not start with the prompt that opens the reply: {prompt[-60:]!r} vs {full[len(prompt) - 60 : len(prompt)]!r}); "
            "use a template that only appends text per message, or turn chat mode off"
        )
    return prompt, full[len(prompt) :]
