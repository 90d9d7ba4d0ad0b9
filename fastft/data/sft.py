"""Generic supervised fine-tuning data: prompt/response columns, or `messages` chat turns.

Prompt/response rows become one example with the loss on the response (+ EOS), the boundary
handled like SQuAD's (fastft.data.tokenize). `chat=True` wraps the prompt as a user turn of the
tokenizer's chat template. `messages` rows (lists of {"role", "content"}) are rendered with the
chat template and every assistant turn is trained; the other turns are context. The template must
be prefix-stable (rendering one more message only appends text); fastft.data.SIMPLE_CHAT_TEMPLATE
is one for tokenizers that have none. Too-long examples are dropped and counted (there is no
context to cut).
"""

from __future__ import annotations

import collections

from fastft.data.tokenize import (
    IGNORE_INDEX,
    encode_pairs,
    eos_id,
    has_chat_template,
    join_example,
    render_chat_prompt,
)


class SFTFormatter:
    def __init__(
        self,
        tokenizer,
        *,
        max_seq_len: int = 1024,
        prompt_column: str = "prompt",
        response_column: str = "response",
        messages_column: str = "messages",
        chat: bool = False,
        system_prompt: str | None = None,
    ):
        if chat and not has_chat_template(tokenizer):
            raise ValueError(
                f"chat=True but tokenizer {type(tokenizer).__name__} has no chat template; set "
                "tokenizer.chat_template (e.g. to fastft.data.SIMPLE_CHAT_TEMPLATE) or use chat=False"
            )
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.prompt_column, self.response_column, self.messages_column = prompt_column, response_column, messages_column
        self.chat = chat
        self.system_prompt = system_prompt
        self.stats: collections.Counter = collections.Counter()

    def _check(self, columns) -> str:
        """'messages' or 'pair': which layout `columns` hold; a clear error if neither."""
        if self.messages_column in columns:
            return "messages"
        if self.prompt_column in columns and self.response_column in columns:
            return "pair"
        raise ValueError(
            f"SFT rows have columns {sorted(columns)}: expected {self.prompt_column!r} and {self.response_column!r}, "
            f"or {self.messages_column!r} (a list of {{'role', 'content'}} turns); rename the columns or set "
            "prompt_column / response_column / messages_column"
        )

    def encode_messages(self, messages: list[dict]) -> dict[str, list[int]]:
        """Token ids and labels of one conversation: loss on every assistant turn (+ its end)."""
        if not has_chat_template(self.tokenizer):
            raise ValueError(
                f"'messages' rows need a chat template, and tokenizer {type(self.tokenizer).__name__} has none; set "
                "tokenizer.chat_template (e.g. to fastft.data.SIMPLE_CHAT_TEMPLATE)"
            )
        if self.system_prompt and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": self.system_prompt}] + list(messages)
        roles = [m.get("role") for m in messages]
        if "assistant" not in roles:
            raise ValueError(f"a conversation has no assistant turn to train on (roles {roles})")
        eos = eos_id(self.tokenizer)
        input_ids: list[int] = []
        labels: list[int] = []
        rendered = ""  # the conversation text already turned into tokens
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, response = render_chat_prompt(self.tokenizer, list(messages[:i]), message["content"])
            if not prompt.startswith(rendered):
                raise ValueError("the chat template is not prefix-stable across turns; use one that only appends text")
            # Context and reply are tokenized apart, so the label boundary is exact by construction.
            context_ids = self.tokenizer(prompt[len(rendered) :], add_special_tokens=False)["input_ids"]
            reply_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            if eos in reply_ids:  # train up to the turn's EOS; what the template puts after it is context
                end = reply_ids.index(eos) + 1
                reply_labels = reply_ids[:end] + [IGNORE_INDEX] * (len(reply_ids) - end)
            else:
                reply_ids = reply_ids + [eos]
                reply_labels = list(reply_ids)
            input_ids += context_ids + reply_ids
            labels += [IGNORE_INDEX] * len(context_ids) + reply_labels
            rendered = prompt + response
        return {"input_ids": input_ids, "labels": labels}

    def encode_batch(self, rows: dict[str, list]) -> dict[str, list]:
        layout = self._check(rows.keys())
        if layout == "messages":
            examples = [self.encode_messages(m) for m in rows[self.messages_column]]
        else:
            prompts, responses = rows[self.prompt_column], rows[self.response_column]
            if self.chat:
                texts = []
                for p, r in zip(prompts, responses):
                    messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
                    texts.append(render_chat_prompt(self.tokenizer, messages + [{"role": "user", "content": p}], r))
                prompts, responses = [t[0] for t in texts], [t[1] for t in texts]
            prompt_ids, response_ids, retokenized = encode_pairs(
                self.tokenizer, prompts, responses, add_special_prefix=not self.chat
            )
            self.stats["boundary_retokenized"] += retokenized
            examples = [join_example(p, r) for p, r in zip(prompt_ids, response_ids)]
        out = {"input_ids": [], "labels": []}
        for example in examples:
            self.stats["examples"] += 1
            if len(example["input_ids"]) > self.max_seq_len:
                self.stats["dropped_too_long"] += 1
                continue
            self.stats["kept"] += 1
            out["input_ids"].append(example["input_ids"])
            out["labels"].append(example["labels"])
        return out

    def encode(self, dataset, *, batch_size: int = 1000):
        """Encode a `datasets.Dataset` / `IterableDataset` (or a list of row dicts) into examples."""
        if isinstance(dataset, list):
            keys = dataset[0].keys() if dataset else []
            encoded = self.encode_batch({k: [r[k] for r in dataset] for k in keys})
            return [dict(zip(encoded, values)) for values in zip(*encoded.values())]
        columns = getattr(dataset, "column_names", None)
        if columns is not None:
            self._check(columns)
        self.stats.clear()
        return dataset.map(self.encode_batch, batched=True, batch_size=batch_size, remove_columns=columns)

    def report(self) -> str:
        s = self.stats
        return (f"SFT examples: {s['examples']} read, {s['kept']} kept, {s['dropped_too_long']} dropped as longer "
                f"than {self.max_seq_len} tokens")
