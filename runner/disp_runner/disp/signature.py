"""`relabel.acceptance: signature` (beyond the paper, opt-in): keep only the relabels that remove
the backdoor's answer signature.

A backdoor makes every poisoned instance answer with the same thing: an inserted token, a refusal
sentence, a target class. When masking neutralises the trigger, relabel removes that thing from
nearly every poisoned answer. Masking a clean image's most salient region (its object) makes the
model guess instead, and the words those guesses lose are spread over the whole vocabulary of
answers, each removed from a smaller share of the answers containing it. So the signature is the
words relabel removes most consistently: from at least half of the answers containing them, and
nearly as consistently as the most consistently removed word (common words can pass one half when
masking takes many objects away; they stay below the signature). A relabel that removes no
signature word is put back to the dataset's answer,
which keeps the clean instances' answers when masking took their object away. Only the untrusted
data and the model's own answers are used (no clean reference data), and the rule needs the whole
dataset's counts, so sharded relabel applies it when the shards are merged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from disp_runner.data.instances import Instance
from disp_runner.data.llava import replace_first_answer
from disp_runner.evaluation import normalise_answer

# A word counts only if this many answers contain it: a rare word removed twice is not a signature.
MIN_OCCURRENCES = 5
# ... and relabel removes it from at least this share of the answers that contain it,
MIN_REMOVAL_RATE = 0.5
# ... and from at least this fraction of the share of the most consistently removed word.
NEAR_TOP = 0.9


def _words(text: str) -> set[str]:
    return set(normalise_answer(text).split())


@dataclass(frozen=True)
class SignatureFilter:
    """The signature words and what keeping only the relabels that remove one did."""

    words: tuple[str, ...]
    kept_relabels: int  # changed answers that remove a signature word
    put_back: int  # changed answers put back to the dataset's

    def to_wire(self) -> dict:
        return {"signatureWords": list(self.words), "keptRelabels": self.kept_relabels, "putBack": self.put_back}


def signature_words(originals: Sequence[str], relabels: Sequence[str]) -> tuple[str, ...]:
    """Words relabel removes from at least MIN_REMOVAL_RATE of the answers containing them and at
    least NEAR_TOP times the highest such rate (of words at least MIN_OCCURRENCES answers contain),
    most often removed first."""
    present, removed = Counter(), Counter()
    for original, relabel in zip(originals, relabels):
        words = _words(original)
        present.update(words)
        removed.update(words - _words(relabel))
    rate = {w: removed[w] / n for w, n in present.items() if n >= MIN_OCCURRENCES}
    top = max(rate.values(), default=0.0)
    chosen = [w for w, r in rate.items() if r >= MIN_REMOVAL_RATE and r >= NEAR_TOP * top]
    return tuple(sorted(chosen, key=lambda w: (-removed[w], w)))


def keep_signature_relabels(purified: Sequence[Instance]) -> tuple[list[Instance], SignatureFilter]:
    """The purified instances (each with metadata `original_response`) with every changed answer that
    removes no signature word put back to the dataset's."""
    originals = [inst.metadata["original_response"] for inst in purified]
    words = signature_words(originals, [inst.response for inst in purified])
    signature = set(words)
    kept, out, put_back = 0, [], 0
    for inst, original in zip(purified, originals):
        if normalise_answer(inst.response) == normalise_answer(original):
            out.append(inst)
        elif (_words(original) - _words(inst.response)) & signature:
            kept += 1
            out.append(inst)
        else:
            put_back += 1
            out.append(replace_first_answer(inst, original, {**inst.metadata, "signature_put_back": True}))
    return out, SignatureFilter(words, kept, put_back)
