"""One data-parallel rank in its own process: read batches, report sample ids and state as JSON.

Job JSON: cfg (DataConfig fields), tokenizer ("mistral"), dp_rank, dp_size, max_batches (null =
the whole epoch), state_at (record the loader state after this many batches), load_state
(optional loader state to resume from), check (bool: assert the batch contract on every batch).
"""

import json
import sys

from data_pipeline.config import DataConfig, TokenizerSpec
from data_pipeline.loader import build_loader
from data_pipeline.tokenizer import load_tokenizer
from tests.data_pipeline.helpers import check_batch


def main(job_path: str, out_path: str) -> None:
    job = json.load(open(job_path))
    fields = dict(job["cfg"])
    fields["tokenizer"] = TokenizerSpec(**fields["tokenizer"])
    cfg = DataConfig(**fields)
    tok = load_tokenizer(cfg.tokenizer)
    batches, tokens, state_at = [], [], None
    with build_loader(cfg, tok, job["dp_rank"], job["dp_size"]) as loader:
        if job.get("load_state"):
            loader.load_state_dict(job["load_state"])
        for batch in loader:
            if job.get("check"):
                check_batch(batch, tok, cfg)
            batches.append(loader.last_sample_ids)
            tokens.append(batch["tokens"].sum().item())
            if len(batches) == job.get("state_at"):
                state_at = loader.state_dict()
            if job.get("max_batches") is not None and len(batches) == job["max_batches"]:
                break
        state = loader.state_dict()
    json.dump({"batches": batches, "token_sums": tokens, "state": state, "state_at": state_at}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
