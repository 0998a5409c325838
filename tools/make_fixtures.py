#!/usr/bin/env python3
"""Write the golden fixtures under tests/fixtures/golden/ with HF transformers as the reference.

Run from the repository root after tools/setup-fixtures-env.sh:

    .venv-fixtures/bin/python tools/make_fixtures.py

Everything is seeded, so a re-run writes the same numbers (up to library versions). Outputs:

- tokenizer/tokenizer.json: a small byte-level BPE tokenizer trained with `tokenizers` on a
  fixed corpus; added tokens <|endoftext|>, <|im_start|>, <|im_end|> (special) and
  <tool_call>, </tool_call> (not special, as in Qwen2.5).
- tied/ and untied/: two tiny random Qwen2ForCausalLM saved with save_pretrained (float32
  safetensors) plus the tokenizer files.
- batch.json: three token sequences of different lengths and the per-token loss weights w_t
  (some zero) used for the gradient.
- tied_expected.safetensors, untied_expected.safetensors (float32, computed in float64):
  `logits.{s}` [len_s - 1, vocab] for inputs seq_s[:-1]; `logprobs.{s}` [len_s - 1] of the next
  token; `loss` = sum_t w_t logp_t; `grad.{hf name}` = dloss/dparam for every parameter.
- tied_expected_temperature.safetensors, untied_expected_temperature.safetensors: the same at
  temperature T = TEMPERATURE (Tool-N1's rollout temperature; verl's actor divides the logits by
  it before the log-softmax, `logits.div_(temperature)` in verl/workers/actor/dp_actor.py):
  `temperature` [1]; `logprobs.{s}` of log_softmax(logits / T); `entropy.{s}` of
  softmax(logits / T); `loss` = sum_t w_t logp_t and `grad.{hf name}` of that loss.
- chat_templates.json: renders of several conversations by apply_chat_template with the real
  Qwen2.5 files in tests/fixtures/qwen2.5/, their token ids, and json.dumps cases for tojson.
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "golden")
QWEN = os.path.join(ROOT, "tests", "fixtures", "qwen2.5")
SEED = 20251121
TEMPERATURE = 0.7

# The Qwen2 pre-tokenizer split pattern (from Qwen2.5's tokenizer.json).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "Hello world! The weather in Paris is sunny today.",
    "You are a helpful assistant. Call the tools you need.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '{"name": "search", "arguments": {"query": "rust programming", "limit": 10}}',
    "<think>The user asks for the weather, so I call get_weather.</think>",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 3.14 1e-05",
    "Tool results come back as JSON objects with fields and values.",
    "Le café est très bon. Das Wetter ist schön. 天气很好。",
] * 20


def train_tokenizer(path_dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                pattern=__import__("tokenizers").Regex(QWEN_SPLIT), behavior="isolated", invert=False
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    os.makedirs(path_dir, exist_ok=True)
    tok.save(os.path.join(path_dir, "tokenizer.json"))
    qwen_cfg = json.load(open(os.path.join(QWEN, "tokenizer_config.json")))
    tcfg = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": qwen_cfg["chat_template"],
    }
    with open(os.path.join(path_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return tok.get_vocab_size(with_added_tokens=True)


def make_model(tied, layers, vocab, seed):
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=2,
        hidden_act="silu",
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    model.eval()
    return model


def expected_outputs(model, seqs, weights):
    model.zero_grad(set_to_none=True)
    out = {}
    loss = torch.zeros((), dtype=torch.float64)
    for s, (seq, w) in enumerate(zip(seqs, weights)):
        ids = torch.tensor([seq[:-1]], dtype=torch.long)
        tgt = torch.tensor(seq[1:], dtype=torch.long)
        logits = model(input_ids=ids).logits[0]  # [L-1, V], float64
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all[torch.arange(len(tgt)), tgt]
        loss = loss + (torch.tensor(w, dtype=torch.float64) * logp).sum()
        out[f"logits.{s}"] = logits.detach().to(torch.float32).contiguous()
        out[f"logprobs.{s}"] = logp.detach().to(torch.float32).contiguous()
    loss.backward()
    out["loss"] = loss.detach().to(torch.float32).reshape(1)
    names = set()
    for name, p in model.named_parameters():
        names.add(name)
        out[f"grad.{name}"] = p.grad.detach().to(torch.float32).contiguous()
    return out


def expected_outputs_temperature(model, seqs, weights, temperature):
    model.zero_grad(set_to_none=True)
    out = {"temperature": torch.tensor([temperature], dtype=torch.float32)}
    loss = torch.zeros((), dtype=torch.float64)
    for s, (seq, w) in enumerate(zip(seqs, weights)):
        ids = torch.tensor([seq[:-1]], dtype=torch.long)
        tgt = torch.tensor(seq[1:], dtype=torch.long)
        logits = model(input_ids=ids).logits[0] / temperature  # [L-1, V], float64
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all[torch.arange(len(tgt)), tgt]
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
        loss = loss + (torch.tensor(w, dtype=torch.float64) * logp).sum()
        out[f"logprobs.{s}"] = logp.detach().to(torch.float32).contiguous()
        out[f"entropy.{s}"] = entropy.detach().to(torch.float32).contiguous()
    loss.backward()
    out["loss"] = loss.detach().to(torch.float32).reshape(1)
    for name, p in model.named_parameters():
        out[f"grad.{name}"] = p.grad.detach().to(torch.float32).contiguous()
    model.zero_grad(set_to_none=True)
    return out


def save_model(model, path_dir, tok_dir):
    if os.path.exists(path_dir):
        shutil.rmtree(path_dir)
    model.to(torch.float32).save_pretrained(path_dir, safe_serialization=True)
    model.to(torch.float64)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, f), os.path.join(path_dir, f))


def chat_cases():
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city — «ünïcode» ok",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "default": 1, "minimum": 0.5, "maximum": 1e20},
                },
                "required": ["city"],
            },
        },
    }
    search = {
        "name": "search",
        "description": "Search the web",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query"],
        },
    }
    nested_args = {
        "city": "Zürich",
        "opts": {"temps": [1.0, 0.1, 1e-05, 2.5e-7, 1e16, 123456789.0, -0.0, 3], "flag": True, "none": None},
        "quote": 'say "hi"\n\ttab \\ back \u0001 ctrl',
        "emoji": "😀 日本語",
    }
    return [
        {
            "name": "system_user_gen",
            "messages": [
                {"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Hello world"},
            ],
            "tools": None,
            "add_generation_prompt": True,
        },
        {
            "name": "no_system_multi_turn",
            "messages": [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "<think>easy</think> 4"},
                {"role": "user", "content": "And 3+3?"},
            ],
            "tools": None,
            "add_generation_prompt": False,
        },
        {
            "name": "tools_no_system",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [weather, search],
            "add_generation_prompt": True,
        },
        {
            "name": "tools_with_system_and_calls",
            "messages": [
                {"role": "system", "content": "Use tools when they help."},
                {"role": "user", "content": "Weather in Zürich and search news"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "get_weather", "arguments": nested_args}},
                        {"name": "search", "arguments": {"query": "news", "limit": 5}},
                    ],
                },
                {"role": "tool", "content": '{"temp": 21.5, "sky": "clear"}'},
                {"role": "tool", "content": '["headline one", "headline two"]'},
                {"role": "assistant", "content": "It is 21.5 °C and clear."},
            ],
            "tools": [weather, search],
            "add_generation_prompt": False,
        },
        {
            "name": "assistant_calls_with_content_no_tools",
            "messages": [
                {"role": "system", "content": "System text with a # Tool section in it."},
                {"role": "user", "content": "Call it"},
                {
                    "role": "assistant",
                    "content": "<think>ok</think>",
                    "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1.5, "y": [1, 2, 3]}}}],
                },
                {"role": "tool", "content": "done"},
                {"role": "user", "content": "Thanks — merci — ありがとう"},
            ],
            "tools": None,
            "add_generation_prompt": True,
        },
        {
            "name": "tool_first_and_system_later",
            "messages": [
                {"role": "user", "content": "start"},
                {"role": "system", "content": "late system"},
                {"role": "tool", "content": "result A"},
                {"role": "user", "content": "end"},
            ],
            "tools": None,
            "add_generation_prompt": True,
        },
    ]


def tojson_cases():
    values = [
        {"a": 1, "b": 1.0, "c": 1e-05, "d": 1e20, "e": 0.1, "f": -2.5, "g": 1e16, "h": 1e15},
        ["x", "é", "日本", "\u0007", "\u007f", "\u2028", "😀", 'q"uote', "back\\slash", "/"],
        {"nested": {"list": [True, False, None, 0, -0.0, 3.0e-320, 5e-324, 1.7976931348623157e308]}},
        {"floats": [100.0, 1234567890123456.0, 12345678901234567.0, 0.0001, 0.00001, 123.456]},
        {},
        [],
        "plain string",
        42,
        3.5,
        None,
        {"k": {"inner": [1, {"deep": []}, {}]}},
    ]
    cases = []
    for v in values:
        for indent in (None, 2):
            cases.append({"value": v, "indent": indent, "expected": json.dumps(v, ensure_ascii=False, indent=indent)})
    cases.append(
        {"value": values[0], "indent": None, "sort_keys": True, "expected": json.dumps(values[0], ensure_ascii=False, sort_keys=True)}
    )
    return cases


def main():
    torch.manual_seed(SEED)
    os.makedirs(OUT, exist_ok=True)
    tok_dir = os.path.join(OUT, "tokenizer")
    n_tokens = train_tokenizer(tok_dir)
    vocab = (n_tokens + 63) // 64 * 64
    print(f"tokenizer: {n_tokens} tokens; model vocab_size {vocab}")

    g = torch.Generator().manual_seed(SEED)
    lengths = [5, 11, 17]
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    weights = []
    for n in lengths:
        w = torch.randn(n - 1, generator=g, dtype=torch.float64)
        w[torch.rand(n - 1, generator=g) < 0.3] = 0.0
        weights.append([round(float(x), 6) for x in w])
    with open(os.path.join(OUT, "batch.json"), "w") as f:
        json.dump({"sequences": seqs, "weights": weights}, f, indent=1)
        f.write("\n")

    for name, tied, layers, seed in (("tied", True, 2, SEED + 10), ("untied", False, 3, SEED + 20)):
        model = make_model(tied, layers, vocab, seed)
        exp = expected_outputs(model, seqs, weights)
        exp_t = expected_outputs_temperature(model, seqs, weights, TEMPERATURE)
        save_model(model, os.path.join(OUT, name), tok_dir)
        save_file(exp, os.path.join(OUT, f"{name}_expected.safetensors"))
        save_file(exp_t, os.path.join(OUT, f"{name}_expected_temperature.safetensors"))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {layers} layers, {n_params} parameters, loss {exp['loss'].item():.6f}")

    qtok = AutoTokenizer.from_pretrained(QWEN)
    renders = []
    for case in chat_cases():
        text = qtok.apply_chat_template(
            case["messages"],
            tools=case["tools"],
            add_generation_prompt=case["add_generation_prompt"],
            tokenize=False,
        )
        ids = qtok(text, add_special_tokens=False)["input_ids"]
        renders.append({**case, "expected": text, "ids": ids})
    fixtures = {
        "hello_world": qtok("Hello world", add_special_tokens=False)["input_ids"],
        "renders": renders,
        "tojson": tojson_cases(),
    }
    with open(os.path.join(OUT, "chat_templates.json"), "w") as f:
        json.dump(fixtures, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"chat templates: {len(renders)} renders, {len(fixtures['tojson'])} tojson cases")
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
