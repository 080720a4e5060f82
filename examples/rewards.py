"""Example Python rewards for `reward.source: python` (or parts of `reward.source: sum`).

rlaif-ray calls a reward function in its labeler actors with one list entry per response:

    fn(prompts=[...], responses=[...], references=[...], fields=[...]) -> [float, ...]

prompts: what the policy was asked (as the judge sees it); responses: the policy's answers;
references: the data's `reference` column (None where there is none); fields: each row's other
columns as a dict (here `max_words` of examples/data/questions.jsonl). Return one finite float
per response. Name one in the config as `examples/rewards.py:within_word_budget` (a file) or
`examples.rewards:within_word_budget` (a module on the Python path).
"""
import re

WORD = re.compile(r"\w+")


def within_word_budget(prompts, responses, references, fields):
    """1 for a non-empty answer within the row's `max_words`, falling linearly to 0 at twice
    that; an empty answer gets -1."""
    out = []
    for response, row in zip(responses, fields):
        words, budget = len(response.split()), int(row.get("max_words") or 40)
        out.append(-1.0 if words == 0 else max(0.0, min(1.0, 2.0 - words / budget)))
    return out


def reference_overlap(prompts, responses, references, fields):
    """Unigram F1 between the answer and the reference answer (0 where there is no reference):
    a cheap, transparent stand-in for a learned reward."""
    out = []
    for response, reference in zip(responses, references):
        got, want = WORD.findall(response.lower()), WORD.findall((reference or "").lower())
        common = sum(min(got.count(w), want.count(w)) for w in set(got))
        out.append(0.0 if not common else 2 * common / (len(got) + len(want)))
    return out
