#!/usr/bin/env python3
"""Generate the tidemill quick-start assets (synthetic chat data, tokenizer, tiny model).

    python tools/quickstart/make_quickstart.py          # writes assets/quickstart/

Deterministic (fixed seeds); needs torch, transformers (5.x), tokenizers.

  assets/quickstart/data/train.jsonl   400 chat samples {"messages": [...]}
  assets/quickstart/data/eval.jsonl     40 chat samples (disjoint, same distribution)
  assets/quickstart/model/             random-init LlamaForCausalLM + tokenizer files
"""
import json
import random
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "assets" / "quickstart"
DATA = OUT / "data"
MODEL = OUT / "model"

SPECIALS = ["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Austria", "Vienna"),
    ("Poland", "Warsaw"), ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Russia", "Moscow"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Nepal", "Kathmandu"),
    ("Ghana", "Accra"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Australia", "Canberra"), ("Scotland", "Edinburgh"),
    ("England", "London"),
]
COLOURS = [
    ("banana", "yellow"), ("lemon", "yellow"), ("strawberry", "red"), ("tomato", "red"),
    ("cherry", "red"), ("carrot", "orange"), ("orange", "orange"), ("pumpkin", "orange"),
    ("lime", "green"), ("cucumber", "green"), ("frog", "green"), ("leaf", "green"),
    ("sky", "blue"), ("sea", "blue"), ("blueberry", "blue"), ("plum", "purple"),
    ("grape", "purple"), ("crow", "black"), ("coal", "black"), ("snow", "white"),
    ("milk", "white"), ("cloud", "white"), ("chocolate", "brown"), ("bear", "brown"),
    ("flamingo", "pink"), ("pig", "pink"), ("elephant", "grey"), ("mouse", "grey"),
    ("sun", "yellow"), ("fire truck", "red"),
]
SOUNDS = [
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
    ("pig", "oink"), ("owl", "hoot"), ("horse", "neigh"), ("lion", "roar"), ("snake", "hiss"),
    ("bee", "buzz"), ("frog", "croak"), ("mouse", "squeak"), ("crow", "caw"), ("donkey", "hee-haw"),
    ("goat", "bleat"), ("wolf", "howl"), ("bird", "tweet"),
]
WORDS = (
    "cat dog sun moon tree book fish bird star cake milk rain snow lamp door road ship frog "
    "bell coin ring king lion bear wolf duck goat corn rice salt tea cup pen map hat box bag "
    "red blue green gold pink apple lemon river stone cloud light water house bread mouse "
    "horse table chair music night plant smile train world paper glass"
).split()
SYSTEMS = ["You are a helpful assistant.", "Answer in one short sentence."]


def build_pool():
    pool = []
    for c, cap in CAPITALS:
        for q in (f"What is the capital of {c}?", f"Tell me the capital of {c}.",
                  f"Which city is the capital of {c}?"):
            pool.append((q, f"The capital of {c} is {cap}."))
    for thing, col in COLOURS:
        art = "an" if thing[0] in "aeiou" else "a"
        subj = "the" if thing in ("sky", "sea", "sun") else art
        for q in (f"What colour is {subj} {thing}?", f"Which colour is {subj} {thing}?"):
            pool.append((q, f"{subj.capitalize()} {thing} is {col}."))
    for animal, snd in SOUNDS:
        art = "an" if animal[0] in "aeiou" else "a"
        for q in (f"What sound does {art} {animal} make?", f"What does {art} {animal} say?"):
            pool.append((q, f"{art.capitalize()} {animal} says {snd}."))
    for w in WORDS:
        for q in (f"Spell {w} backwards.", f"Write {w} backwards."):
            pool.append((q, w[::-1]))
    convs = []
    for q, a in pool:
        for sys_prompt in [None] + SYSTEMS:
            msgs = []
            if sys_prompt:
                msgs.append({"role": "system", "content": sys_prompt})
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            convs.append({"messages": msgs})
    return convs


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def render(msgs):
    s = "<s>"
    for m in msgs:
        s += f"<|{m['role']}|>\n{m['content']}<|end|>\n"
    return s


def train_tokenizer(texts):
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos)]
    )
    return tok


def main():
    rng = random.Random(20240601)
    convs = build_pool()
    rng.shuffle(convs)
    train, evals = convs[:400], convs[400:440]
    assert not {json.dumps(c) for c in train} & {json.dumps(c) for c in evals}
    write_jsonl(DATA / "train.jsonl", train)
    write_jsonl(DATA / "eval.jsonl", evals)

    # tokenizer: trained on the rendered chat text of the whole pool (fixed order)
    texts = [render(c["messages"]) for c in convs]
    tok = train_tokenizer(texts)
    vocab = tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))

    if MODEL.exists():
        shutil.rmtree(MODEL)
    MODEL.mkdir(parents=True)
    tok.save(str(MODEL / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }
    (MODEL / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")

    # model
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        # 0.1 instead of the usual 0.02: LoRA cannot train the (frozen) embeddings/lm_head,
        # and with std 0.02 the reachable logit margin caps the loss near ln(vocab) - 1.3,
        # so a LoRA run barely moves (6.29 -> 5.73 in 100 steps); with 0.1 it falls to ~4.3.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("</s>"),
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id,
        eos_token_id=[tok.token_to_id("</s>"), tok.token_to_id("<|end|>")],
        pad_token_id=cfg.pad_token_id,
        max_new_tokens=32,
        do_sample=False,
    )
    model.save_pretrained(MODEL, safe_serialization=True)

    # ---- checks
    hf = AutoTokenizer.from_pretrained(MODEL)
    assert hf.bos_token == "<s>" and hf.eos_token == "</s>" and hf.pad_token == "</s>"
    assert hf("hello").input_ids[0] == hf.bos_token_id
    msgs = train[0]["messages"]
    text = hf.apply_chat_template(msgs, tokenize=False)
    assert text == render(msgs), (text, render(msgs))
    ids = hf.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert ids == hf(text, add_special_tokens=False).input_ids and ids.count(hf.bos_token_id) == 1
    gen = hf.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert gen == render(msgs[:-1]) + "<|assistant|>\n"
    assert hf.decode(ids, skip_special_tokens=False) == text
    lens = [len(hf.apply_chat_template(c["messages"], tokenize=True, return_dict=True)["input_ids"]) for c in convs]
    print(f"vocab {vocab}; tokens/sample min {min(lens)} mean {sum(lens) / len(lens):.1f} max {max(lens)}")
    print("example:", repr(text))
    print("tokens:", hf.convert_ids_to_tokens(ids))
    print(f"train {len(train)} eval {len(evals)} (pool {len(convs)})")


if __name__ == "__main__":
    main()
