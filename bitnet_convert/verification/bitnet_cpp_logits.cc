// A GGUF file's logits, or its greedy continuation, in bitnet.cpp: compiled by bitnet_cpp.py against the
// llama.h and libllama of the user's own bitnet.cpp build (its llama.cpp fork's C API of October 2024).
//
//   bitnet_cpp_logits logits MODEL.gguf IDS OUT     float32 [len(IDS), n_vocab], row-major, to OUT
//   bitnet_cpp_logits trace MODEL.gguf IDS OUT      the same, then every projection's input (below)
//   bitnet_cpp_logits greedy MODEL.gguf IDS N OUT   up to N new token ids (int32) to OUT; stops at end of generation
//
// trace appends, for each product of a `blk.*` weight in the order computed, the float32 input it multiplied:
// u32 name length, the weight's name, u32 ne0 (values per token), u32 ne1 (tokens), ne0 * ne1 float32.
// IDS: token ids separated by commas. One thread: bitnet.cpp's OpenMP threads busy-wait and collapse when another
// process shares a core, and every row of a product is computed by one thread either way (same numbers).
// The context keeps bitnet.cpp's defaults where they shape the arithmetic: F16 K/V cache, no flash attention.
// Exit status 0 on success; a one-line message on stderr and status 1 when the runtime refuses the file.

#include "ggml.h"
#include "llama.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

void quiet_log(enum ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

std::vector<llama_token> parse_ids(const char * text) {
    std::vector<llama_token> ids;
    const char * p = text;
    while (*p) {
        char * end = nullptr;
        long value = strtol(p, &end, 10);
        if (end == p) {
            break;
        }
        ids.push_back(static_cast<llama_token>(value));
        p = *end == ',' ? end + 1 : end;
    }
    return ids;
}

int fail(const std::string & why) {
    fprintf(stderr, "%s\n", why.c_str());
    return 1;
}

// Decode `ids` at positions start.. ; logits requested for every token when `all`, else for the last one.
bool decode(llama_context * ctx, const std::vector<llama_token> & ids, int start, bool all) {
    llama_batch batch = llama_batch_init(static_cast<int32_t>(ids.size()), 0, 1);
    for (size_t i = 0; i < ids.size(); ++i) {
        batch.token[i] = ids[i];
        batch.pos[i] = static_cast<llama_pos>(start + i);
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = all || i + 1 == ids.size();
    }
    batch.n_tokens = static_cast<int32_t>(ids.size());
    const bool ok = llama_decode(ctx, batch) == 0;
    llama_batch_free(batch);
    return ok;
}

bool write_all(const char * path, const void * data, size_t bytes) {
    FILE * out = fopen(path, "wb");
    if (out == nullptr) {
        return false;
    }
    const bool ok = fwrite(data, 1, bytes, out) == bytes;
    return fclose(out) == 0 && ok;
}

// The inputs of the projections' products, gathered by the scheduler's evaluation callback.
struct Trace {
    std::vector<char> bytes;

    void put(const void * data, size_t size) {
        const char * p = static_cast<const char *>(data);
        bytes.insert(bytes.end(), p, p + size);
    }
};

bool is_projection_product(const ggml_tensor * t) {
    return t->op == GGML_OP_MUL_MAT && strncmp(t->src[0]->name, "blk.", 4) == 0 &&
           t->src[1]->type == GGML_TYPE_F32;
}

bool observe(ggml_tensor * t, bool ask, void * user_data) {
    if (ask) {
        return is_projection_product(t);
    }
    if (!is_projection_product(t)) {
        return true;
    }
    Trace * trace = static_cast<Trace *>(user_data);
    const ggml_tensor * x = t->src[1];
    const uint32_t name_length = static_cast<uint32_t>(strlen(t->src[0]->name));
    const uint32_t ne0 = static_cast<uint32_t>(x->ne[0]);
    const uint32_t ne1 = static_cast<uint32_t>(x->ne[1]);
    trace->put(&name_length, sizeof name_length);
    trace->put(t->src[0]->name, name_length);
    trace->put(&ne0, sizeof ne0);
    trace->put(&ne1, sizeof ne1);
    for (uint32_t row = 0; row < ne1; ++row) {
        const char * base = static_cast<const char *>(x->data) + row * x->nb[1];
        for (uint32_t col = 0; col < ne0; ++col) {
            trace->put(base + col * x->nb[0], sizeof(float));
        }
    }
    return true;
}

}  // namespace

int main(int argc, char ** argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    const bool traced = mode == "trace";
    if (!(((mode == "logits" || traced) && argc == 5) || (mode == "greedy" && argc == 6))) {
        return fail("usage: bitnet_cpp_logits logits|trace MODEL IDS OUT | greedy MODEL IDS N OUT");
    }
    const std::vector<llama_token> prompt = parse_ids(argv[3]);
    const int max_new = mode == "greedy" ? atoi(argv[4]) : 0;
    const char * out_path = argv[argc - 1];
    if (prompt.empty()) {
        return fail("no token ids given");
    }

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mparams = llama_model_default_params();
    mparams.use_mmap = false;
    llama_model * model = llama_load_model_from_file(argv[2], mparams);
    if (model == nullptr) {
        return fail("bitnet.cpp could not load the model");
    }
    const int n_vocab = llama_n_vocab(model);
    for (llama_token id : prompt) {
        if (id < 0 || id >= n_vocab) {
            return fail("token id " + std::to_string(id) + " is outside the vocabulary");
        }
    }

    const int length = static_cast<int>(prompt.size()) + max_new;
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = static_cast<uint32_t>(length < 64 ? 64 : length);
    cparams.n_batch = cparams.n_ctx;
    cparams.n_ubatch = cparams.n_ctx;
    cparams.n_threads = 1;
    cparams.n_threads_batch = 1;
    cparams.flash_attn = false;
    cparams.no_perf = true;
    Trace trace;
    if (traced) {
        cparams.cb_eval = observe;
        cparams.cb_eval_user_data = &trace;
    }
    llama_context * ctx = llama_new_context_with_model(model, cparams);
    if (ctx == nullptr) {
        return fail("bitnet.cpp could not create a context for the model");
    }

    int status = 0;
    if (mode != "greedy") {
        if (!decode(ctx, prompt, 0, true)) {
            status = fail("llama_decode failed");
        } else {
            std::vector<float> logits(prompt.size() * static_cast<size_t>(n_vocab));
            for (size_t i = 0; i < prompt.size(); ++i) {
                memcpy(&logits[i * n_vocab], llama_get_logits_ith(ctx, static_cast<int32_t>(i)),
                       sizeof(float) * n_vocab);
            }
            std::vector<char> out(reinterpret_cast<const char *>(logits.data()),
                                  reinterpret_cast<const char *>(logits.data() + logits.size()));
            out.insert(out.end(), trace.bytes.begin(), trace.bytes.end());
            if (!write_all(out_path, out.data(), out.size())) {
                status = fail(std::string("cannot write ") + out_path);
            }
        }
    } else {
        std::vector<llama_token> generated;
        std::vector<llama_token> step = prompt;
        int position = 0;
        while (static_cast<int>(generated.size()) < max_new) {
            if (!decode(ctx, step, position, false)) {
                status = fail("llama_decode failed");
                break;
            }
            position += static_cast<int>(step.size());
            const float * row = llama_get_logits_ith(ctx, -1);
            llama_token best = 0;
            for (int v = 1; v < n_vocab; ++v) {
                if (row[v] > row[best]) {  // the first of equal maxima, as argmax
                    best = v;
                }
            }
            generated.push_back(best);
            if (llama_token_is_eog(model, best)) {
                break;
            }
            step.assign(1, best);
        }
        if (status == 0 && !write_all(out_path, generated.data(), sizeof(llama_token) * generated.size())) {
            status = fail(std::string("cannot write ") + out_path);
        }
    }
    llama_free(ctx);
    llama_free_model(model);
    llama_backend_free();
    return status;
}
