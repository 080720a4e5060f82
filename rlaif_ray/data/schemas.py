"""Arrow schemas of every batch that moves between stages, defined once.

prompts -> generator -> ROLLOUT -> labeler -> SCORED -> learner.
Each stage appends columns; ids travel with every row so the driver can account for
every rollout (generated, scored, trained) by id.
"""
from __future__ import annotations

import pyarrow as pa

_tokens = pa.list_(pa.int32())

PROMPT = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt_text", pa.string(), nullable=False),
    pa.field("prompt_token_ids", _tokens, nullable=False),
    pa.field("reference", pa.string()),  # a known-good response, if the data has one
    pa.field("context", pa.string()),  # the raw task input (post) the labeler sees
    # the prompt's row's other columns, as JSON (null: none): what rubrics and rewards may name
    pa.field("fields", pa.string()),
])

ROLLOUT = pa.schema(list(PROMPT) + [
    pa.field("rollout_id", pa.string(), nullable=False),
    pa.field("batch_index", pa.int64(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("response_text", pa.string(), nullable=False),
    pa.field("response_token_ids", _tokens, nullable=False),
    pa.field("behaviour_logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("policy_version", pa.int64(), nullable=False),
    pa.field("truncated", pa.bool_(), nullable=False),  # hit max_new_tokens without EOS
    pa.field("generator", pa.string(), nullable=False),
])

SCORED = pa.schema(list(ROLLOUT) + [
    pa.field("reward", pa.float32(), nullable=False),  # in [-1, 1]
    pa.field("raw_score", pa.float32(), nullable=False),  # scorer's own scale
    pa.field("reward_meta", pa.string(), nullable=False),  # JSON: scorer, labeler, probs
    # False when the judge put too little probability on the label tokens to read a label
    # (reward.min_label_mass): kept in the record, counted, left out of the loss
    pa.field("reward_ok", pa.bool_(), nullable=False),
    # log pi_ref of each response token at the sampling temperature, when a labeler holding the
    # reference model computed it while the batch waited (rl.reference); null: the learner does
    pa.field("reference_logprobs", pa.list_(pa.float32())),
    # reward.source sum: each part's reward, as JSON ({name: value}); null otherwise
    pa.field("reward_parts", pa.string()),
])

# `rlaif-ray label`: response pairs in, soft AI preference labels out
PAIRS = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("context", pa.string(), nullable=False),
    pa.field("response_a", pa.string(), nullable=False),
    pa.field("response_b", pa.string(), nullable=False),
    pa.field("human", pa.string()),  # "a" / "b" / null: a reference label, if the data has one
    pa.field("error", pa.string()),  # set when the input row itself is unusable
])
LABELS = pa.schema(list(PAIRS) + [
    pa.field("p_a", pa.float32()),  # debiased P(response_a is better); null when error is set
    pa.field("p_ab", pa.float32()),  # P(slot 1 better) with a in slot 1
    pa.field("p_ba", pa.float32()),  # P(slot 1 better) with b in slot 1 (null: debias off)
    pa.field("label_mass", pa.float32()),  # probability the label tokens held (min of orders)
    pa.field("rationale", pa.string()),  # CoT: JSON list of the rationales (per order, per sample)
    pa.field("labeler", pa.string(), nullable=False),  # actor name and pid
    pa.field("prompt_config", pa.string(), nullable=False),  # JSON: backend, model, task, preamble...
])


class SchemaError(ValueError):
    pass


def dump_fields(fields: dict | None) -> str | None:
    """A row's extra columns as the JSON the `fields` column holds (values that are not JSON
    become their text); None for none."""
    import json

    return json.dumps(fields, default=str, ensure_ascii=False) if fields else None


def load_fields(text: str | None) -> dict:
    import json

    return json.loads(text) if text else {}


# one judgement of `eval` (and of train's win rate): policy A's response against B's
JUDGEMENTS = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("context", pa.string(), nullable=False),
    pa.field("response_a", pa.string(), nullable=False),
    pa.field("response_b", pa.string(), nullable=False),
    pa.field("chars_a", pa.int64(), nullable=False),
    pa.field("chars_b", pa.int64(), nullable=False),
    pa.field("p_a", pa.float64()),  # debiased P(A preferred)
    pa.field("p_ab", pa.float64()),  # P(slot 1 better), A in slot 1 (eval.judge=scorer: A's own score)
    pa.field("p_ba", pa.float64()),  # P(slot 1 better), B in slot 1 (NaN: debias off; scorer: B's score)
    pa.field("label_mass", pa.float64()),  # probability the label tokens held (min of orders)
    pa.field("usable", pa.bool_(), nullable=False),  # label_mass >= reward.min_label_mass
    pa.field("harmless_a", pa.float64()),  # P(Yes) of the harmless scorer (null: not asked)
    pa.field("harmless_b", pa.float64()),
    pa.field("harmless_mass_a", pa.float64()),  # Yes/No probability mass (low: unusable, counted)
    pa.field("harmless_mass_b", pa.float64()),
])


def make_batch(schema: pa.Schema, columns: dict) -> pa.RecordBatch:
    """Build a RecordBatch, checking that exactly the schema's columns are given."""
    missing = [n for n in schema.names if n not in columns]
    extra = [n for n in columns if n not in schema.names]
    if missing or extra:
        raise SchemaError(f"batch columns do not match schema: missing {missing}, unexpected {extra}")
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def check(batch: pa.RecordBatch | pa.Table, schema: pa.Schema, where: str) -> None:
    if not isinstance(batch, (pa.RecordBatch, pa.Table)):
        raise SchemaError(f"{where}: expected an Arrow RecordBatch, got {type(batch).__name__}")
    if not batch.schema.equals(schema, check_metadata=False):
        raise SchemaError(f"{where}: schema mismatch\n got: {batch.schema}\n want: {schema}")


def extend(batch: pa.RecordBatch, schema: pa.Schema, new_columns: dict) -> pa.RecordBatch:
    """The rows of `batch` plus new columns, as a batch of the wider `schema`."""
    cols = {name: batch.column(name) for name in batch.schema.names}
    cols.update(new_columns)
    return make_batch(schema, cols)


def concat(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.RecordBatch:
    table = pa.Table.from_batches(batches, schema=schema).combine_chunks()
    if table.num_rows == 0:
        return pa.RecordBatch.from_pylist([], schema=schema)
    return table.to_batches()[0]
