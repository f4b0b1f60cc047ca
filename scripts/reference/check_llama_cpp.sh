#!/usr/bin/env bash
# Run Temper's llama.cpp LoRA GGUF export and its merged models in llama.cpp itself, and check
# that llama.cpp computes what `temper eval` / `temper generate` compute. Run by hand, never in
# CI (it downloads llama.cpp and builds it; a first run took 5 min 47 s on 2 cores, 2.5 min of
# it the llama.cpp build, which later runs reuse):
#
#   cargo build --release            # or any temper binary: TEMPER=path/to/temper
#   TEMPER=target/release/temper TEMPER_REF_VENV=/path/to/venv-with-torch \
#       bash scripts/reference/check_llama_cpp.sh [CASE ...]
#
# Environment:
#   TEMPER           temper binary (default: temper on PATH)
#   TEMPER_REF_VENV  a venv with torch + transformers (scripts/reference/requirements.txt); its
#                    site-packages are added (by a .pth file, read only) to the script's own venv,
#                    which holds what llama.cpp's converter needs besides (sentencepiece,
#                    requests). Unset: requirements.txt is pip-installed into the script's venv.
#   STORIES          the pretrained stories260K folder (default: ../shared/models/stories260K)
#   TEMPER_LLCPP_WORK  work dir (default /tmp/temper-llama-cpp); the sdist, the llama.cpp build
#                    and the venv are reused when present, everything per case is redone.
#   CASES on the command line: a subset of the ones below (default: all).
#
# What it does:
#   1. `pip download --no-binary llama-cpp-python --no-deps llama-cpp-python==$LLAMA_CPP_PYTHON`
#      (the sdist from PyPI; `--no-binary :all:` would also build cmake and ninja from source
#      just to read the sdist's metadata), unpacks its vendor/llama.cpp, builds libllama with
#      cmake (CPU only, target `llama` only, -j2; apt-get installs cmake/g++ when missing), and
#      compiles temper_llcpp.cpp (below) against llama.h. gguf-py comes from the same tree.
#   2. Per case (architecture): a model folder (symlinked weights, the stories260K tokenizer
#      for fixtures, plus a SentencePiece tokenizer.model written from tokenizer.json: the
#      converter's Gemma/Phi-3 vocab code requires one, and its tokenizer.json-only Llama path
#      (LlamaHfVocab) writes placeholder scores (-1000 for every token) with which llama.cpp's
#      SPM tokenizer merges in the wrong order); convert_hf_to_gguf.py --outtype f32 and f16;
#      `temper train` (10 steps, lr 1e-2, r 8, all linear layers: ppl moves by >= 1 %);
#      `temper export --format gguf` (f32, f16); `temper merge` (f32, and --dtype f16) and
#      convert_hf_to_gguf.py of the merged folders.
#   3. Perplexity as `temper eval` defines it: every row of tests/fixtures/eval.jsonl tokenised
#      alone with BOS, all positions scored, token-weighted mean NLL, ppl = exp. llama-perplexity
#      cannot do that: it tokenises the whole file as one stream, cuts it into n_ctx chunks and
#      scores only the second half of each chunk (`first = n_ctx/2`, no flag changes it), so
#      temper_llcpp does it against llama.h: llama_tokenize (llama.cpp's own tokenizer; its ids
#      are checked against the tokenizer.json ids), one llama_decode per row with logits for
#      every position, log-softmax in double. F32 K/V cache (the default F16 cache rounds K/V),
#      flash attention off. Greedy: llama_sampler_init_greedy, 24 new tokens from "Once upon a
#      time", text compared byte for byte with `temper generate` (greedy by default): "yes".
#      "yes*": the continuation of a random fixture has byte tokens that are not valid UTF-8,
#      which llama.cpp prints raw and temper's decoder as U+FFFD; then llama.cpp's ids, printed
#      the way temper prints (tokenizer.json decode, text ending in U+FFFD held back), must give
#      temper's text exactly (such a byte token is then only known to be some invalid byte).
#   4. One row per (case, f32|f16, lora|merged): temper ppl, llama.cpp ppl, relative difference,
#      whether the token ids and greedy continuations are identical. Exit status 1 if any row
#      disagrees or a case fails.
#
# Rows: lora = llama.cpp base GGUF + `--lora` GGUF from `temper export` vs `temper eval
# --adapter` (f16: f16 base GGUF + f16 adapter vs temper's f32 numbers); merged = GGUF of the
# `temper merge` folder vs `temper eval` of that folder (f16: `temper merge --dtype f16`).
# Tolerance on perplexity: f32 1e-4 relative (measured <= 2.6e-7, and 1.1e-5 for gemma and
# gemma2, whose GELU ggml's CPU backend takes from an f16 table: GGML_GELU_FP16 rounds the
# input to f16). f16 5e-3 relative: ggml's CPU matmul also rounds the activations to f16 for
# f16 weights (vec_dot_type of F16 is F16), and in the lora/f16 rows the base and adapter
# weights are rounded to f16 (2^-11 = 4.9e-4 relative each) while temper computes the f32
# model; measured <= 5.0e-4 (gemma2, whose random model has a loss of 22.8 nats). Greedy text
# must be identical for f32 and f16.
set -euo pipefail

LLAMA_CPP_PYTHON=0.3.36   # vendors llama.cpp 0c1e57098 (its CHANGELOG)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${TEMPER_LLCPP_WORK:-/tmp/temper-llama-cpp}
TEMPER=${TEMPER:-temper}
STORIES=${STORIES:-$REPO/../shared/models/stories260K}
FIXTURES=$REPO/tests/fixtures/models
EVAL=$REPO/tests/fixtures/eval.jsonl
TRAIN=$REPO/datasets/stories/train.jsonl
PROMPT="Once upon a time"
NEW_TOKENS=24
TOL_F32=1e-4
TOL_F16=5e-3

# case | source folder | config.json overrides (JSON, "-" for none) | lora rows (yes/no) | extra target modules
# mistral: llama.cpp runs Mistral as `llama` and ignores sliding_window (fixture: 6), so the
#   window is removed for both sides. smollm3: llama.cpp hard-codes no RoPE on every 4th layer
#   (fixture: every 2nd). granite, smollm3: `temper export --format gguf` does not support
#   them, so merged rows only. llama: the adapter also targets lm_head (GGUF output.weight).
ALL_CASES=(
  "stories260K|$STORIES|-|yes|"
  "llama|$FIXTURES/llama|-|yes|lm_head"
  "llama_tied_bias|$FIXTURES/llama_tied_bias|-|yes|"
  "mistral_nosw|$FIXTURES/mistral|{\"sliding_window\": null}|yes|"
  "qwen2|$FIXTURES/qwen2|-|yes|"
  "qwen3|$FIXTURES/qwen3|-|yes|"
  "gemma|$FIXTURES/gemma|-|yes|"
  "gemma2|$FIXTURES/gemma2|-|yes|"
  "phi3|$FIXTURES/phi3|-|yes|"
  "granite|$FIXTURES/granite|-|no|"
  "smollm3_nope4|$FIXTURES/smollm3|{\"no_rope_layers\": [1, 1, 1, 0], \"no_rope_layer_interval\": 4}|no|"
)
# Not run (printed at the end; see docs/MERGE.md):
LEFT_OUT=(
  "mistral (sliding_window 6 as in the fixture): llama.cpp's llama architecture has no sliding-window attention; rows longer than 6 tokens differ (run as mistral_nosw)"
  "smollm3 (no RoPE on every 2nd layer as in the fixture): llama.cpp hard-codes n_no_rope_layer_step = 4 (run as smollm3_nope4); temper export has no smollm3 GGUF mapping"
  "gemma3_text: the converter ignores layer_types (llama.cpp's fixed 5:1 sliding pattern) and llama.cpp hard-codes the attention scale 1/sqrt(head_dim) (fixture: query_pre_attn_scalar 20, head_dim 18); temper export has no gemma3 GGUF mapping"
  "olmo2, olmo3: convert_hf_to_gguf.py's OLMo vocab code only takes GPT-2-style BPE tokenizers whose pre-tokenizer hash it knows and refuses the fixtures' (stories260K) tokenizer: 'BPE pre-tokenizer was not recognized'"
  "granite, smollm3: lora rows (temper export --format gguf supports llama, mistral, qwen2, qwen3, phi3, gemma, gemma2 only); merged rows are run"
)

log() { printf '\n== %s\n' "$*" >&2; }
start_time=$(date +%s)
mkdir -p "$WORK"
command -v "$TEMPER" >/dev/null || { echo "temper binary not found: set TEMPER" >&2; exit 2; }
TEMPER=$(command -v "$TEMPER")

# ---------------------------------------------------------------- llama.cpp: source and build
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  log "installing cmake and g++"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null
fi
SRC=$WORK/src/llama_cpp_python-$LLAMA_CPP_PYTHON
LLAMA=$SRC/vendor/llama.cpp
if [ ! -f "$LLAMA/CMakeLists.txt" ]; then
  log "downloading llama-cpp-python $LLAMA_CPP_PYTHON (sdist)"
  python3 -m pip download --quiet --no-binary llama-cpp-python --no-deps \
    "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$WORK/sdist"
  mkdir -p "$WORK/src"
  tar xzf "$WORK/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$WORK/src"
fi
LLAMA_COMMIT=$(sed -n "/^## \[$LLAMA_CPP_PYTHON\]/,/^## \[/p" "$SRC/CHANGELOG.md" | grep -o 'llama.cpp@[0-9a-f]*' | head -1)
BUILD=$WORK/build
if [ ! -f "$BUILD/bin/libllama.so" ]; then
  log "building llama.cpp ($LLAMA_COMMIT): target llama, CPU only, -j2"
  cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DGGML_CCACHE=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_OPENSSL=OFF \
    > "$WORK/cmake-configure.log"
  cmake --build "$BUILD" --target llama -j2 > "$WORK/cmake-build.log"
fi

# ---------------------------------------------------------------- temper_llcpp (C++, llama.h)
mkdir -p "$WORK/tools"
cat > "$WORK/tools/temper_llcpp.cpp" <<'CPP'
// temper_llcpp: the llama.cpp side of scripts/reference/check_llama_cpp.sh, against llama.h only.
//
//   temper_llcpp nll MODEL.gguf LORA.gguf|- ROWS IDS_OUT
//       ROWS: texts separated by NUL bytes. Each row is tokenised alone by llama.cpp's own
//       tokenizer (add_special: BOS as the GGUF says), decoded in one batch with logits for
//       every position; the NLL of token t+1 under the log-softmax (in double) of position t is
//       summed over all rows and positions. Prints {"loss","tokens","perplexity"} like
//       `temper eval --json`; writes each row's token ids (space-separated) to IDS_OUT.
//   temper_llcpp gen MODEL.gguf LORA.gguf|- PROMPT N
//       Greedy (llama_sampler_init_greedy) continuation of PROMPT, at most N tokens, stopping at
//       an end-of-generation token. Prints the detokenised prompt + continuation (BOS left
//       out) and a newline, like `temper generate`; the ids go to stderr.
//
// Context: F32 K/V cache (the default F16 cache would round K and V), flash attention off,
// one ubatch per row, LoRA scale 1.0 (llama.cpp multiplies by adapter.lora.alpha / r itself).
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

static void log_cb(enum ggml_log_level level, const char * text, void *) {
    static const bool verbose = getenv("TEMPER_LLCPP_VERBOSE") != nullptr;
    if (verbose || level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
}

static void die(const std::string & msg) {
    fprintf(stderr, "temper_llcpp: %s\n", msg.c_str());
    exit(1);
}

static std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text) {
    const int n = -llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), nullptr, 0, true, false);
    std::vector<llama_token> ids(n);
    if (llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), ids.data(), n, true, false) != n) {
        die("tokenize failed");
    }
    return ids;
}

static std::string detokenize(const llama_vocab * vocab, const std::vector<llama_token> & ids) {
    std::vector<char> buf(ids.size() * 64 + 64);
    const int n = llama_detokenize(vocab, ids.data(), (int32_t) ids.size(), buf.data(), (int32_t) buf.size(), true, false);
    if (n < 0) {
        die("detokenize failed");
    }
    return std::string(buf.data(), n);
}

int main(int argc, char ** argv) {
    if (argc != 6 || (strcmp(argv[1], "nll") != 0 && strcmp(argv[1], "gen") != 0)) {
        fprintf(stderr, "usage: %s nll MODEL LORA|- ROWS IDS_OUT\n       %s gen MODEL LORA|- PROMPT N\n", argv[0], argv[0]);
        return 2;
    }
    const std::string mode = argv[1];
    const std::string model_path = argv[2];
    const std::string lora_path = argv[3];

    llama_log_set(log_cb, nullptr);
    llama_backend_init();

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mparams);
    if (!model) {
        die("cannot load model " + model_path);
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    const uint32_t n_ctx = 512;
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = n_ctx;
    cparams.n_batch = n_ctx;
    cparams.n_ubatch = n_ctx;
    cparams.n_seq_max = 1;
    cparams.n_threads = 2;
    cparams.n_threads_batch = 2;
    cparams.type_k = GGML_TYPE_F32;
    cparams.type_v = GGML_TYPE_F32;
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cparams.swa_full = true;
    cparams.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        die("cannot create context");
    }

    if (lora_path != "-") {
        llama_adapter_lora * lora = llama_adapter_lora_init(model, lora_path.c_str());
        if (!lora) {
            die("cannot load LoRA adapter " + lora_path);
        }
        float scale = 1.0f;
        if (llama_set_adapters_lora(ctx, &lora, 1, &scale) != 0) {
            die("cannot set LoRA adapter");
        }
    }

    const int n_vocab = llama_vocab_n_tokens(vocab);

    if (mode == "nll") {
        std::ifstream in(argv[4], std::ios::binary);
        if (!in) {
            die(std::string("cannot read ") + argv[4]);
        }
        const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        std::vector<std::string> rows;
        size_t start = 0;
        while (start < all.size()) {
            size_t end = all.find('\0', start);
            if (end == std::string::npos) {
                end = all.size();
            }
            rows.push_back(all.substr(start, end - start));
            start = end + 1;
        }
        std::ofstream ids_out(argv[5]);
        double nll = 0.0;
        long tokens = 0;
        for (const auto & text : rows) {
            const std::vector<llama_token> ids = tokenize(vocab, text);
            for (size_t i = 0; i < ids.size(); ++i) {
                ids_out << (i ? " " : "") << ids[i];
            }
            ids_out << "\n";
            const int n = (int) ids.size();
            if (n < 2) {
                continue;
            }
            if ((uint32_t) n > n_ctx) {
                die("row longer than the context");
            }
            llama_memory_clear(llama_get_memory(ctx), true);
            llama_batch batch = llama_batch_init(n, 0, 1);
            for (int i = 0; i < n; ++i) {
                batch.token[i] = ids[i];
                batch.pos[i] = i;
                batch.n_seq_id[i] = 1;
                batch.seq_id[i][0] = 0;
                batch.logits[i] = true;
            }
            batch.n_tokens = n;
            if (llama_decode(ctx, batch) != 0) {
                die("decode failed");
            }
            for (int i = 0; i + 1 < n; ++i) {
                const float * logits = llama_get_logits_ith(ctx, i);
                double mx = -INFINITY;
                for (int v = 0; v < n_vocab; ++v) {
                    mx = std::max(mx, (double) logits[v]);
                }
                double sum = 0.0;
                for (int v = 0; v < n_vocab; ++v) {
                    sum += std::exp((double) logits[v] - mx);
                }
                nll += mx + std::log(sum) - (double) logits[ids[i + 1]];
                tokens += 1;
            }
            llama_batch_free(batch);
        }
        const double loss = nll / (double) tokens;
        printf("{\"loss\":%.17g,\"tokens\":%ld,\"perplexity\":%.17g}\n", loss, tokens, std::exp(loss));
    } else {
        const std::string prompt = argv[4];
        const int n_new = atoi(argv[5]);
        std::vector<llama_token> ids = tokenize(vocab, prompt);
        llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
        llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
        llama_memory_clear(llama_get_memory(ctx), true);
        std::vector<llama_token> next = ids;
        for (int step = 0; step < n_new; ++step) {
            llama_batch batch = llama_batch_get_one(next.data(), (int32_t) next.size());
            if (llama_decode(ctx, batch) != 0) {
                die("decode failed");
            }
            const llama_token id = llama_sampler_sample(smpl, ctx, -1);
            if (llama_vocab_is_eog(vocab, id)) {
                break;
            }
            ids.push_back(id);
            next.assign(1, id);
        }
        for (size_t i = 0; i < ids.size(); ++i) {
            fprintf(stderr, "%s%d", i ? " " : "ids: ", ids[i]);
        }
        fprintf(stderr, "\n");
        // Without the BOS: llama.cpp then strips the SentencePiece dummy-prefix space of the
        // first piece, as the Hugging Face decoder does.
        const std::vector<llama_token> text_ids(ids.begin() + (!ids.empty() && ids[0] == llama_vocab_bos(vocab)), ids.end());
        printf("%s\n", detokenize(vocab, text_ids).c_str());
        llama_sampler_free(smpl);
    }

    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
CPP
g++ -O2 -std=c++17 "$WORK/tools/temper_llcpp.cpp" -I"$LLAMA/include" -I"$LLAMA/ggml/include" \
  -L"$BUILD/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$BUILD/bin" -o "$WORK/tools/temper_llcpp"
LLCPP=$WORK/tools/temper_llcpp

# ---------------------------------------------------------------- python: venv, gguf-py, helper
VENV=$WORK/venv
if [ ! -x "$VENV/bin/python" ]; then
  log "venv for llama.cpp's converter"
  if [ -n "${TEMPER_REF_VENV:-}" ]; then
    "$TEMPER_REF_VENV/bin/python" -m venv "$VENV"
    site=$("$TEMPER_REF_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    own=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$site" > "$own/zz-temper-ref-venv.pth"
  else
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet -r "$REPO/scripts/reference/requirements.txt"
  fi
  "$VENV/bin/pip" install --quiet "sentencepiece==0.2.3" "requests==2.34.2" "pyyaml>=5.1" "tqdm>=4.27"
fi
PY=$VENV/bin/python
export PYTHONPATH=$LLAMA/gguf-py   # gguf-py of the same tree (the converter inserts it too)
"$PY" -c 'import gguf, sentencepiece, torch, transformers' \
  || { echo "the venv $VENV lacks packages; remove it and rerun" >&2; exit 2; }

cat > "$WORK/tools/helper.py" <<'PYEOF'
"""Python side of check_llama_cpp.sh (runs in the script's venv)."""
import json
import struct
import sys


def varint(n):
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_varint(num, value):
    return varint(num << 3) + varint(value)


def field_bytes(num, data):
    return varint((num << 3) | 2) + varint(len(data)) + data


def field_float(num, value):
    return varint((num << 3) | 5) + struct.pack("<f", value)


def spm(tokenizer_json, out, *jsonl_files):
    """Write the SentencePiece BPE tokenizer.model equivalent to a Llama-style tokenizer.json
    (BPE with byte fallback, '▁' for spaces, merges in vocab-id order), protobuf written by
    hand (sentencepiece_model.proto field numbers); checked with sentencepiece itself."""
    tok = json.load(open(tokenizer_json, encoding="utf-8"))
    model = tok["model"]
    assert model["type"] == "BPE" and model.get("byte_fallback"), "not a Llama-style BPE tokenizer.json"
    vocab = model["vocab"]
    inv = {i: s for s, i in vocab.items()}
    special = {t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    unk = vocab[model["unk_token"]]
    # The HF converter made the merges from the sentencepiece scores, so merges ordered by the
    # id of the merged piece means score = -id gives llama.cpp's SPM tokenizer the same order.
    merged = [vocab["".join(m.split(" ") if isinstance(m, str) else m)] for m in model["merges"]]
    assert merged == sorted(merged), "merges are not in vocab-id order"
    pieces = b""
    for i in range(len(inv)):
        s = inv[i]
        if i == unk:
            typ, score = 2, 0.0  # UNKNOWN
        elif i in special:
            typ, score = 3, 0.0  # CONTROL
        elif len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            typ, score = 6, 0.0  # BYTE
        else:
            typ, score = 1, -float(i)  # NORMAL
        pieces += field_bytes(1, field_bytes(1, s.encode("utf-8")) + field_float(2, score) + field_varint(3, typ))
    # TrainerSpec: model_type BPE, vocab_size, byte_fallback, unk/bos/eos/pad ids.
    trainer = field_varint(3, 2) + field_varint(4, len(inv)) + field_varint(35, 1)
    trainer += field_varint(40, unk) + field_varint(41, vocab.get("<s>", -1)) + field_varint(42, vocab.get("</s>", -1))
    trainer += field_varint(43, -1)
    # NormalizerSpec: identity, add_dummy_prefix, keep whitespace, escape whitespace as '▁'.
    normalizer = field_bytes(1, b"identity") + field_varint(3, 1) + field_varint(4, 0) + field_varint(5, 1)
    with open(out, "wb") as f:
        f.write(pieces + field_bytes(2, trainer) + field_bytes(3, normalizer))

    from sentencepiece import SentencePieceProcessor
    from tokenizers import Tokenizer

    sp = SentencePieceProcessor()
    sp.LoadFromFile(out)
    hf = Tokenizer.from_file(tokenizer_json)
    texts = [json.loads(line)["text"] for a in jsonl_files for line in open(a, encoding="utf-8") if line.strip()]
    for text in texts + ["Tom had a red ball.  123 é€ ☃"]:
        a = [sp.bos_id()] + sp.EncodeAsIds(text)
        b = hf.encode(text).ids
        assert a == b, f"sentencepiece {a} != tokenizers {b} for {text!r}"


def rows(jsonl, out):
    texts = [json.loads(line)["text"] for line in open(jsonl, encoding="utf-8") if line.strip()]
    with open(out, "wb") as f:
        f.write(b"\0".join(t.encode("utf-8") for t in texts))


def hfids(tokenizer_json, jsonl, out):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(tokenizer_json)
    with open(out, "w") as f:
        for line in open(jsonl, encoding="utf-8"):
            if line.strip():
                f.write(" ".join(map(str, hf.encode(json.loads(line)["text"]).ids)) + "\n")


def greedy(tokenizer_json, prompt, llama_gen, llama_err, temper_gen):
    """yes: llama.cpp's text is temper's, byte for byte. yes*: the continuation has byte tokens
    that are not valid UTF-8 (llama.cpp prints the raw bytes, temper's decoder U+FFFD), and
    llama.cpp's ids, printed the way `temper generate` prints (tokenizer.json decode without
    special tokens, streamed: a text ending in U+FFFD is held back), give temper's text."""
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(tokenizer_json)
    want = open(temper_gen, "rb").read()
    if open(llama_gen, "rb").read() == want:
        print("yes")
        return
    line = [l for l in open(llama_err) if l.startswith("ids: ")][-1]
    ids = [int(x) for x in line.split()[1:]]
    prompt_ids = hf.encode(prompt).ids
    if ids[: len(prompt_ids)] != prompt_ids:
        print("no")
        return
    printed = hf.decode(prompt_ids, skip_special_tokens=True)
    for k in range(len(prompt_ids) + 1, len(ids) + 1):
        text = hf.decode(ids[:k], skip_special_tokens=True)
        if text.startswith(printed) and not text.endswith("\ufffd"):
            printed = text
    print("yes*" if (printed + "\n").encode("utf-8") == want else "no")


def config(src, out, overrides):
    cfg = json.load(open(src))
    cfg.update(json.loads(overrides))
    json.dump(cfg, open(out, "w"), indent=2)


def ppl(path):
    print(json.load(open(path))["perplexity"])


def table(results, tol_f32, tol_f16):
    """results: TSV case, type, path, temper json, llama.cpp json, ids same, greedy same; or
    case, ERROR, message."""
    tol = {"f32": float(tol_f32), "f16": float(tol_f16)}
    head = ("case", "type", "path", "temper ppl", "llama.cpp ppl", "rel diff", "tokens (ids same)", "greedy identical", "agree")
    lines, bad = [], 0
    for line in open(results):
        f = line.rstrip("\n").split("\t")
        if f[1] == "ERROR":
            bad += 1
            lines.append((f[0], "-", "-", "-", "-", "-", "-", "-", "NO: " + f[2]))
            continue
        name, ty, path, tj, lj, ids_same, greedy = f
        t, l = json.loads(tj), json.loads(lj)
        rel = abs(l["perplexity"] - t["perplexity"]) / t["perplexity"]
        ok = rel <= tol[ty] and t["tokens"] == l["tokens"] and ids_same == "yes" and greedy in ("yes", "yes*")
        bad += not ok
        lines.append((name, ty, path, f"{t['perplexity']:.6f}", f"{l['perplexity']:.6f}", f"{rel:.1e}",
                      f"{l['tokens']} ({ids_same})", greedy, "yes" if ok else "NO"))
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in lines:
        print("| " + " | ".join(r) + " |")
    print(f"\n{len(lines) - bad} rows agree, {bad} disagree "
          f"(perplexity tolerance: f32 {tol_f32}, f16 {tol_f16} relative)")
    return 1 if bad else 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    fn = {"spm": spm, "rows": rows, "hfids": hfids, "greedy": greedy, "config": config, "ppl": ppl, "table": table}[cmd]
    sys.exit(fn(*sys.argv[2:]) or 0)
PYEOF
HELPER=$WORK/tools/helper.py

# ---------------------------------------------------------------- shared inputs
TOKDIR=$WORK/tokenizer
mkdir -p "$TOKDIR"
cp "$STORIES/tokenizer.json" "$STORIES/tokenizer_config.json" "$TOKDIR/"
"$PY" "$HELPER" spm "$TOKDIR/tokenizer.json" "$TOKDIR/tokenizer.model" "$EVAL" "$TRAIN"
"$PY" "$HELPER" rows "$EVAL" "$WORK/eval.rows"
"$PY" "$HELPER" hfids "$TOKDIR/tokenizer.json" "$EVAL" "$WORK/eval.hf-ids"

convert() {  # convert MODEL_DIR OUT.gguf f32|f16 MODEL_TYPE
  # --model-name: llama.cpp tweaks token attributes of models whose general.name contains
  # "phi3" and then needs Phi-3's <|endoftext|>, which the stories260K vocabulary lacks.
  "$PY" "$LLAMA/convert_hf_to_gguf.py" "$1" --outfile "$2" --outtype "$3" --model-name temper-check \
    > "$2.log" 2>&1 || { tail -5 "$2.log" >&2; return 1; }
  case "$4" in
    gemma*)  # Gemma converters hard-code Gemma's add_space_prefix = false; our tokenizer
             # (stories260K's, like Llama's) prepends '▁', as tokenizer.model says.
      "$PY" "$LLAMA/gguf-py/gguf/scripts/gguf_set_metadata.py" "$2" tokenizer.ggml.add_space_prefix 1 --force \
        >> "$2.log" 2>&1 ;;
  esac
}

# llama.cpp on MODEL [LORA]: nll json -> $3.json, ids same -> $3.ids-same, greedy text -> $3.gen
llcpp() {
  "$LLCPP" nll "$1" "$2" "$WORK/eval.rows" "$3.ids" > "$3.json" 2> "$3.err" || { cat "$3.err" >&2; return 1; }
  if cmp -s "$3.ids" "$WORK/eval.hf-ids"; then echo yes > "$3.ids-same"; else echo no > "$3.ids-same"; fi
  "$LLCPP" gen "$1" "$2" "$PROMPT" "$NEW_TOKENS" > "$3.gen" 2> "$3.gen.err" || { cat "$3.gen.err" >&2; return 1; }
}

same_greedy() {  # same_greedy LLCPP_PREFIX TEMPER_GEN -> yes / yes* / no
  "$PY" "$HELPER" greedy "$TOKDIR/tokenizer.json" "$PROMPT" "$1.gen" "$1.gen.err" "$2"
}

run_case() {  # run_case NAME SRC OVERRIDES LORA_ROWS EXTRA_TARGETS
  local name=$1 src=$2 overrides=$3 lora_rows=$4 extra=$5
  local d=$WORK/cases/$name
  rm -rf "$d" && mkdir -p "$d/model"
  # Model folder: weights symlinked, config (with overrides), tokenizer files.
  if [ "$overrides" = "-" ]; then ln -s "$src/config.json" "$d/model/config.json"
  else "$PY" "$HELPER" config "$src/config.json" "$d/model/config.json" "$overrides"; fi
  for f in "$src"/*.safetensors "$src"/model.safetensors.index.json "$src"/generation_config.json; do
    if [ -e "$f" ]; then ln -s "$f" "$d/model/"; fi
  done
  cp "$TOKDIR"/tokenizer.json "$TOKDIR"/tokenizer_config.json "$TOKDIR"/tokenizer.model "$d/model/"
  local mt
  mt=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["model_type"])' "$d/model/config.json")

  log "$name ($mt): convert base"
  convert "$d/model" "$d/base-f32.gguf" f32 "$mt"
  convert "$d/model" "$d/base-f16.gguf" f16 "$mt"

  log "$name: train"
  local seq=32 targets=all-linear
  if [ "$name" = stories260K ]; then seq=64; fi
  if [ -n "$extra" ]; then targets="[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, $extra]"; fi
  cat > "$d/recipe.yaml" <<EOF
base_model: $d/model
data:
  train: $TRAIN
  format: text
  seq_len: $seq
lora:
  r: 8
  lora_alpha: 16
  lora_dropout: 0.0
  target_modules: $targets
train:
  max_steps: 10
  micro_batch_size: 4
  gradient_accumulation_steps: 1
  learning_rate: 1.0e-2
  lr_scheduler: constant
  warmup_steps: 0
  weight_decay: 0.0
  max_grad_norm: 1.0
  seed: 42
output:
  dir: $d/run
device: cpu
EOF
  "$TEMPER" train "$d/recipe.yaml" > "$d/train.log" 2>&1 || { tail -5 "$d/train.log" >&2; return 1; }
  local adapter=$d/run/adapter

  log "$name: temper eval / generate"
  "$TEMPER" eval --model "$d/model" --data "$EVAL" --json --device cpu > "$d/temper-base.json"
  "$TEMPER" eval --model "$d/model" --adapter "$adapter" --data "$EVAL" --json --device cpu > "$d/temper-lora.json"
  "$TEMPER" generate --model "$d/model" --adapter "$adapter" --prompt "$PROMPT" --max-new-tokens "$NEW_TOKENS" \
    --device cpu > "$d/temper-lora.gen"
  local pb pl
  pb=$("$PY" "$HELPER" ppl "$d/temper-base.json"); pl=$("$PY" "$HELPER" ppl "$d/temper-lora.json")
  echo "$name: temper ppl base $pb, with the adapter $pl" >&2
  "$PY" -c 'import sys; b, a = map(float, sys.argv[1:]); sys.exit(abs(a - b) / b < 0.01)' "$pb" "$pl" \
    || { echo "the adapter changes ppl by < 1 %" >&2; return 1; }

  log "$name: temper merge (f32, f16) and convert"
  "$TEMPER" merge --model "$d/model" --adapter "$adapter" --out "$d/merged-f32" > "$d/merge-f32.log" 2>&1
  "$TEMPER" merge --model "$d/model" --adapter "$adapter" --dtype f16 --out "$d/merged-f16" > "$d/merge-f16.log" 2>&1
  local ty
  for ty in f32 f16; do
    convert "$d/merged-$ty" "$d/merged-$ty.gguf" "$ty" "$mt"
    "$TEMPER" eval --model "$d/merged-$ty" --data "$EVAL" --json --device cpu > "$d/temper-merged-$ty.json"
    "$TEMPER" generate --model "$d/merged-$ty" --prompt "$PROMPT" --max-new-tokens "$NEW_TOKENS" --device cpu \
      > "$d/temper-merged-$ty.gen"
  done

  log "$name: llama.cpp"
  for ty in f32 f16; do
    if [ "$lora_rows" = yes ]; then
      "$TEMPER" export --adapter "$adapter" --format gguf --base "$d/model" --outtype "$ty" --out "$d/lora-$ty.gguf" >&2
      llcpp "$d/base-$ty.gguf" "$d/lora-$ty.gguf" "$d/llcpp-lora-$ty"
      printf '%s\t%s\tlora\t%s\t%s\t%s\t%s\n' "$name" "$ty" "$(cat "$d/temper-lora.json")" "$(cat "$d/llcpp-lora-$ty.json")" \
        "$(cat "$d/llcpp-lora-$ty.ids-same")" "$(same_greedy "$d/llcpp-lora-$ty" "$d/temper-lora.gen")" \
        >> "$d/rows.tsv"
    fi
    llcpp "$d/merged-$ty.gguf" - "$d/llcpp-merged-$ty"
    printf '%s\t%s\tmerged\t%s\t%s\t%s\t%s\n' "$name" "$ty" "$(cat "$d/temper-merged-$ty.json")" "$(cat "$d/llcpp-merged-$ty.json")" \
      "$(cat "$d/llcpp-merged-$ty.ids-same")" "$(same_greedy "$d/llcpp-merged-$ty" "$d/temper-merged-$ty.gen")" \
      >> "$d/rows.tsv"
  done
  # The base GGUF alone, for the record (not a table row).
  "$LLCPP" nll "$d/base-f32.gguf" - "$WORK/eval.rows" /dev/null > "$d/llcpp-base-f32.json" 2>/dev/null || true
}

# ---------------------------------------------------------------- cases
want=("$@")
RESULTS=$WORK/results.tsv
: > "$RESULTS"
for spec in "${ALL_CASES[@]}"; do
  IFS='|' read -r name src overrides lora_rows extra <<< "$spec"
  if [ ${#want[@]} -gt 0 ] && [[ ! " ${want[*]} " =~ " $name " ]]; then continue; fi
  set +e
  ( set -e; run_case "$name" "$src" "$overrides" "$lora_rows" "$extra" )
  rc=$?
  set -e
  if [ $rc -eq 0 ]; then cat "$WORK/cases/$name/rows.tsv" >> "$RESULTS"
  else printf '%s\tERROR\tcase failed (exit %s), see %s\n' "$name" "$rc" "$WORK/cases/$name" >> "$RESULTS"; fi
done

echo
echo "llama.cpp: vendor/llama.cpp of llama-cpp-python $LLAMA_CPP_PYTHON ($LLAMA_COMMIT), temper: $("$TEMPER" --version)"
echo "eval: $EVAL ($(wc -l < "$EVAL") rows), greedy: \"$PROMPT\" + $NEW_TOKENS tokens"
echo
set +e
"$PY" "$HELPER" table "$RESULTS" "$TOL_F32" "$TOL_F16"
status=$?
set -e
echo
echo "Not run:"
for l in "${LEFT_OUT[@]}"; do echo "  - $l"; done
echo
echo "total time: $(( $(date +%s) - start_time )) s"
exit $status
