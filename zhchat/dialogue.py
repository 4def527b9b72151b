"""The dialogue format, shared by training, evaluation and serving.

A dialogue is laid out as

    <|endoftext|> [<|system|> s <|end|>] <|user|> u1 <|end|> <|assistant|> a1 <|end|> ...

Generation prompts end with `<|assistant|>` and a reply ends at `<|end|>`. Labels follow
the Hugging Face convention (aligned with input_ids, -100 where there is no loss; the model
shifts them itself). Role tokens are never learned (who speaks next is given); reply
contents and their `<|end|>` are, so the model learns to stop.

User text is encoded with special-token matching switched off: a user who types
"<|end|>" gets those characters, not the token.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

EOS = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS = [EOS, SYSTEM, USER, ASSISTANT, END]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
IGNORE_INDEX = -100

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


class PromptTooLong(ValueError):
    """The newest message alone does not fit the context with room for the reply."""


def roles_for_turns(n: int) -> list[Role]:
    """Speakers alternate and the last turn is the reply: [.., user, assistant]."""
    return ["assistant" if (n - 1 - i) % 2 == 0 else "user" for i in range(n)]


def messages_from_turns(turns: Sequence[str], system: str | None = None) -> list[Message]:
    msgs = [Message("system", system)] if system else []
    msgs += [Message(r, t) for r, t in zip(roles_for_turns(len(turns)), turns)]
    return msgs


class DialogueFormat:
    """Encodes dialogues for training and prompts for generation with one tokenizer.

    `tokenizer` is a transformers fast tokenizer (anything with `backend_tokenizer`).
    """

    def __init__(self, tokenizer, context_length: int, loss_on: Literal["replies", "all"] = "replies"):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.loss_on = loss_on
        # A private copy with special-token matching off, so content is only ever text.
        self._text_tok = copy.deepcopy(tokenizer.backend_tokenizer)
        self._text_tok.encode_special_tokens = True
        self._text_tok.no_truncation()
        self._text_tok.no_padding()
        ids = {}
        for tok in SPECIAL_TOKENS:
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or (tokenizer.unk_token_id is not None and i == tokenizer.unk_token_id):
                raise ValueError(
                    f"tokenizer has no {tok!r} token; train it with zhchat or call "
                    "zhchat.tokenizer.add_dialogue_tokens() on a pretrained one"
                )
            ids[tok] = i
        self.eos_id = ids[EOS]
        self.end_id = ids[END]
        self.role_ids = {role: ids[tok] for role, tok in ROLE_TOKENS.items()}
        self.stop_ids = (self.end_id, self.eos_id)

    # -- text ---------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return self._text_tok.encode(text, add_special_tokens=False).ids

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._text_tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _encoded_parts(self, messages: Sequence[Message]):
        """(the first system message, the other messages), each paired with its token ids."""
        contents = self.encode_texts([m.content for m in messages])
        pairs = list(zip(messages, contents))
        system = [(m, c) for m, c in pairs if m.role == "system"][:1]
        return system, [(m, c) for m, c in pairs if m.role != "system"]

    # -- training -------------------------------------------------------------------------
    def _trainable(self, role: Role) -> bool:
        return role == "assistant" or (self.loss_on == "all" and role == "user")

    def encode_dialogue(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """input_ids and labels for one dialogue, oldest turns dropped to fit the context.

        If even the last message does not fit, its content is cut at the end.
        """
        system, turns = self._encoded_parts(messages)
        budget = self.context_length - 1  # the leading <|endoftext|>
        head: list[tuple[Message, list[int]]] = []
        if system and len(system[0][1]) + 2 <= budget // 2:  # a system prompt may take half
            head = system
            budget -= len(system[0][1]) + 2
        kept: list[tuple[Message, list[int]]] = []
        for m, c in reversed(turns):
            need = len(c) + 2
            if need <= budget:
                kept.append((m, c))
                budget -= need
            elif not kept:  # the newest turn alone is too long: keep its beginning
                kept.append((m, c[: max(budget - 2, 0)]))
                budget = 0
            else:
                break
        ids, labels = [self.eos_id], [IGNORE_INDEX]
        for m, c in head + kept[::-1]:
            body = c + [self.end_id]
            ids += [self.role_ids[m.role]] + body
            labels += [IGNORE_INDEX] + (body if self._trainable(m.role) else [IGNORE_INDEX] * len(body))
        return ids, labels

    def pack_texts(self, texts: Iterable[str]) -> Iterator[tuple[list[int], list[int]]]:
        """Plain text, separated by <|endoftext|>, cut into full context-length blocks.

        The loss falls on every token; the last partial block is dropped (as nanoGPT/HF do).
        """
        buf: list[int] = []
        n = self.context_length
        for text in texts:
            buf.extend(self.encode_text(text))
            buf.append(self.eos_id)
            while len(buf) >= n:
                block, buf = buf[:n], buf[n:]
                yield block, list(block)

    # -- generation -----------------------------------------------------------------------
    def build_prompt(self, messages: Sequence[Message], max_new_tokens: int) -> list[int]:
        """Prompt ids ending with <|assistant|>, oldest turns dropped to leave room for the reply.

        Raises PromptTooLong if the newest message alone does not fit.
        """
        if not messages or messages[-1].role != "user":
            raise ValueError("the last message must be from the user")
        budget = self.context_length - max_new_tokens - 2  # <|endoftext|> and <|assistant|>
        system, turns = self._encoded_parts(messages)
        kept: list[tuple[Message, list[int]]] = []
        for m, c in reversed(turns):
            need = len(c) + 2
            if need > budget:
                if not kept:
                    raise PromptTooLong(
                        f"the last message is {len(c)} tokens; with max_tokens={max_new_tokens} "
                        f"the context of {self.context_length} tokens leaves room for {max(budget - 2, 0)}"
                    )
                break
            kept.append((m, c))
            budget -= need
        if system and len(system[0][1]) + 2 <= budget:
            kept.append(system[0])
        ids = [self.eos_id]
        for m, c in kept[::-1]:
            ids += [self.role_ids[m.role]] + c + [self.end_id]
        return ids + [self.role_ids["assistant"]]
