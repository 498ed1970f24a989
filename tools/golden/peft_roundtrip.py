"""Golden values for the PEFT / transformers round trip of tidemill's own outputs.

tools/golden/roundtrip.sh trains with tidemill (tests/fixtures/roundtrip/*.toml) and copies
the results to tests/fixtures/roundtrip/{lora_llama2,lora_qwen2,lora_mixtral,sft_llama2}/; this script
loads them with peft.PeftModel.from_pretrained / AutoModelForCausalLM.from_pretrained,
unchanged, and writes the mean token loss on tests/fixtures/data/eval_tokens.jsonl to
tests/fixtures/roundtrip/golden.json (same loss definition as make_fixtures.py).

Run: /tmp/refenv/bin/python tools/golden/peft_roundtrip.py
"""
import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from make_fixtures import golden_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"


def rows():
    with open(FIX / "data" / "eval_tokens.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def base(name):
    return AutoModelForCausalLM.from_pretrained(
        FIX / "models" / name, dtype=torch.float32, attn_implementation="eager"
    )


def main():
    torch.manual_seed(0)
    data = rows()
    out = {
        "generated_with": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "peft": peft.__version__,
            "script": "tools/golden/peft_roundtrip.py",
        }
    }
    for name in ["llama2", "qwen2", "mixtral"]:
        adapter = FIX / "roundtrip" / f"lora_{name}"
        model = peft.PeftModel.from_pretrained(base(name), adapter)
        model.eval()
        g = golden_for(model, data)
        # the adapter must change the model, or the round trip proves nothing
        plain = golden_for(base(name), data)
        assert abs(g["loss"] - plain["loss"]) > 1e-3, (g["loss"], plain["loss"])
        out[f"lora_{name}"] = {"loss": g["loss"], "tokens": g["tokens"], "base_loss": plain["loss"]}
        merged = model.merge_and_unload()
        out[f"lora_{name}"]["merged_loss"] = golden_for(merged, data)["loss"]
    sft = AutoModelForCausalLM.from_pretrained(
        FIX / "roundtrip" / "sft_llama2", dtype=torch.float32, attn_implementation="eager"
    )
    g = golden_for(sft, data)
    out["sft_llama2"] = {"loss": g["loss"], "tokens": g["tokens"]}
    (FIX / "roundtrip" / "golden.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
