"""SQuAD as the reference recipe: prompt formatting, answer-only labels, context truncation.

Each example becomes a prompt (context + question, from `template`, or the tokenizer's chat
template in chat mode) and a response (the first gold answer + EOS). Only response tokens carry
labels. SQuAD v2.0's unanswerable questions are dropped, or trained towards `unanswerable_answer`.

Too long for `max_seq_len`: the context is cut to a window of whole tokens around the answer
(never the question or the answer); if even an answer-only window cannot fit, the example is
dropped. `stats` counts what happened; `report()` says it in one line.
"""

from __future__ import annotations

import collections
import logging
import string

from fastft.data.tokenize import encode_pairs, has_chat_template, join_example, render_chat_prompt

logger = logging.getLogger(__name__)

DEFAULT_SQUAD_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
_MAX_FIT_ATTEMPTS = 6


def check_template(template: str) -> None:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    missing = {"context", "question"} - fields
    unknown = fields - {"context", "question", "title"}
    if missing or unknown:
        raise ValueError(
            f"SQuAD prompt template {template!r} "
            + (f"lacks {sorted('{' + m + '}' for m in missing)}" if missing else f"has unknown field(s) {sorted(unknown)}")
            + "; it must contain {context} and {question} (and may contain {title}), "
            "e.g. " + repr(DEFAULT_SQUAD_TEMPLATE)
        )


class SquadFormatter:
    """Encode SQuAD-format rows into `{"input_ids", "labels", "id"}` examples.

    template: prompt with {context}, {question} (optional {title}); ignored in chat mode.
    answer_prefix: text between the prompt and the answer, trained as part of the response
        (" " after the default template's "Answer:", so the answer reads as running text).
    chat: render the prompt with the tokenizer's chat template (as one user message, after an
        optional `system_prompt`); falls back to `template`, with a warning, when it has none.
    unanswerable_answer: None drops SQuAD v2.0's unanswerable questions; a string trains them
        towards that answer.
    """

    def __init__(
        self,
        tokenizer,
        *,
        max_seq_len: int = 1024,
        template: str = DEFAULT_SQUAD_TEMPLATE,
        answer_prefix: str = " ",
        chat: bool = False,
        system_prompt: str | None = None,
        unanswerable_answer: str | None = None,
    ):
        check_template(template)
        if max_seq_len < 8:
            raise ValueError(f"max_seq_len must be at least 8 tokens, got {max_seq_len}")
        if chat and not has_chat_template(tokenizer):
            logger.warning("chat=True but tokenizer %s has no chat template: using the plain prompt template",
                           type(tokenizer).__name__)
            chat = False
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.template = template
        self.answer_prefix = "" if chat else answer_prefix
        self.chat = chat
        self.system_prompt = system_prompt
        self.unanswerable_answer = unanswerable_answer
        self.stats: collections.Counter = collections.Counter()

    # -- text ---------------------------------------------------------------------------------
    def render_prompt(self, context: str, question: str, title: str = "") -> str:
        if not self.chat:
            return self.template.format(context=context, question=question, title=title)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        # One user turn holding the same context/question text as the plain template.
        messages.append({"role": "user", "content": self.template.format(context=context, question=question, title=title)})
        return messages

    def _texts(self, context: str, question: str, title: str, answer: str) -> tuple[str, str]:
        rendered = self.render_prompt(context, question, title)
        if self.chat:
            return render_chat_prompt(self.tokenizer, rendered, answer)
        return rendered, self.answer_prefix + answer

    def _encode(self, contexts, questions, titles, answers):
        texts = [self._texts(c, q, t, a) for c, q, t, a in zip(contexts, questions, titles, answers)]
        prompts, responses, retokenized = encode_pairs(
            self.tokenizer, [p for p, _ in texts], [r for _, r in texts], add_special_prefix=not self.chat
        )
        self.stats["boundary_retokenized"] += retokenized
        return prompts, responses

    # -- truncation ---------------------------------------------------------------------------
    def _fit(self, context: str, question: str, title: str, answer: str, answer_start: int | None, budget: int):
        """(prompt ids, response ids, context) with the context cut to fit `budget`, or None."""
        encoded = self.tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        n = len(offsets)
        if answer_start is None:  # no span to keep (unanswerable): keep the start of the context
            first, last = 0, 0
        else:
            answer_end = answer_start + len(answer)
            inside = [i for i, (s, e) in enumerate(offsets) if s < answer_end and e > answer_start]
            if not inside:
                return None
            first, last = inside[0], inside[-1] + 1
        prompts, responses = self._encode([context], [question], [title], [answer])
        keep = n - (len(prompts[0]) + len(responses[0]) - budget)
        for _ in range(_MAX_FIT_ATTEMPTS):
            if keep < max(last - first, 1):
                return None
            # A window of `keep` context tokens, centred on the answer's tokens.
            start = min(max(first - (keep - (last - first)) // 2, 0), n - keep)
            cut = context[offsets[start][0] : offsets[start + keep - 1][1]].strip()
            prompts, responses = self._encode([cut], [question], [title], [answer])
            excess = len(prompts[0]) + len(responses[0]) - budget
            if excess <= 0:
                return prompts[0], responses[0], cut
            keep -= excess
        return None

    # -- datasets -----------------------------------------------------------------------------
    def _answer(self, answers) -> tuple[str, int | None] | None:
        texts = list(answers["text"]) if isinstance(answers, dict) else [a["text"] for a in answers]
        starts = list(answers["answer_start"]) if isinstance(answers, dict) else [a["answer_start"] for a in answers]
        if texts:
            return texts[0], (int(starts[0]) if starts else None)
        if self.unanswerable_answer is None:
            return None
        return self.unanswerable_answer, None

    def encode_batch(self, rows: dict[str, list]) -> dict[str, list]:
        """Batched encoder (for `Dataset.map(batched=True)`): returns the kept rows only."""
        missing = [c for c in ("context", "question", "answers") if c not in rows]
        if missing:
            raise ValueError(
                f"SQuAD-format rows are missing {missing} (have {sorted(rows)}); expected the hub's squad columns "
                "id, title, context, question, answers{text[], answer_start[]}"
            )
        n = len(rows["context"])
        ids = rows.get("id") or [str(i) for i in range(n)]
        titles = rows.get("title") or [""] * n
        picked = []
        for i in range(n):
            self.stats["examples"] += 1
            answer = self._answer(rows["answers"][i])
            if answer is None:
                self.stats["dropped_unanswerable"] += 1
                continue
            picked.append((i, *answer))
        prompts, responses = self._encode(
            [rows["context"][i] for i, _, _ in picked], [rows["question"][i] for i, _, _ in picked],
            [titles[i] or "" for i, _, _ in picked], [a for _, a, _ in picked],
        )
        out = {"id": [], "input_ids": [], "labels": []}
        for (i, answer, start), prompt, response in zip(picked, prompts, responses):
            if len(prompt) + len(response) > self.max_seq_len:
                fitted = self._fit(rows["context"][i], rows["question"][i], titles[i] or "", answer, start, self.max_seq_len)
                if fitted is None:
                    self.stats["dropped_too_long"] += 1
                    continue
                prompt, response, _ = fitted
                self.stats["truncated"] += 1
            self.stats["kept"] += 1
            example = join_example(prompt, response)
            out["id"].append(str(ids[i]))
            out["input_ids"].append(example["input_ids"])
            out["labels"].append(example["labels"])
        return out

    def encode(self, dataset, *, batch_size: int = 1000):
        """Encode a `datasets.Dataset` (counts complete on return) or `IterableDataset` (counts grow
        as it is iterated). Columns other than id/input_ids/labels are dropped."""
        columns = getattr(dataset, "column_names", None)
        if isinstance(dataset, list):
            rows = {k: [r.get(k) for r in dataset] for k in ("id", "title", "context", "question", "answers")}
            encoded = self.encode_batch(rows)
            return [dict(zip(encoded, values)) for values in zip(*encoded.values())]
        self.stats.clear()
        return dataset.map(self.encode_batch, batched=True, batch_size=batch_size, remove_columns=columns)

    def report(self) -> str:
        s = self.stats
        return (
            f"SQuAD examples: {s['examples']} read, {s['kept']} kept ({s['truncated']} with the context truncated "
            f"to {self.max_seq_len} tokens), {s['dropped_too_long']} dropped as too long even so, "
            f"{s['dropped_unanswerable']} unanswerable dropped"
            + (f"; {s['boundary_retokenized']} with the answer tokenized apart" if s["boundary_retokenized"] else "")
        )

    # -- evaluation ---------------------------------------------------------------------------
    def eval_prompts(self, dataset, *, max_new_tokens: int = 32) -> tuple[list[tuple[str, list[int]]], dict[str, list[str]]]:
        """(id, prompt ids) pairs for generation, the context cut like in training so that prompt +
        `max_new_tokens` fit `max_seq_len`; and id -> gold answers (empty for unanswerable)."""
        budget = self.max_seq_len - max_new_tokens
        prompts, references = [], {}
        for row in dataset:
            qid = str(row.get("id"))
            answers = row["answers"]
            golds = list(answers["text"]) if isinstance(answers, dict) else [a["text"] for a in answers]
            first = self._answer(answers)
            answer, start = first if first is not None else ("", None)
            title = row.get("title") or ""
            prompt, response = self._encode([row["context"]], [row["question"]], [title], [answer])
            prompt = prompt[0]
            if len(prompt) > budget:
                # Same cut as training, with the answer's budget reserved for generation.
                fitted = self._fit(row["context"], row["question"], title, answer, start, budget + len(response[0]))
                if fitted is None:
                    continue
                prompt = fitted[0]
            prompts.append((qid, prompt))
            references[qid] = golds
        return prompts, references
