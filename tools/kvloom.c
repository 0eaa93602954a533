/* kvloom: the command-line front end. Each subcommand lives in its own cmd_*.c. */
#include <stdio.h>
#include <string.h>

int kvl_cmd_logits(int argc, char **argv);
int kvl_cmd_generate(int argc, char **argv);
int kvl_cmd_ingest(int argc, char **argv);
int kvl_cmd_ask(int argc, char **argv);
int kvl_cmd_blend_eval(int argc, char **argv);
int kvl_cmd_blend_bench(int argc, char **argv);
int kvl_cmd_codec_eval(int argc, char **argv);
int kvl_cmd_codec_profile(int argc, char **argv);
int kvl_cmd_gpu_bench(int argc, char **argv);

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *help;
} cmds[] = {
    {"logits", kvl_cmd_logits, "full prefill of a token file, writes float32 logits"},
    {"generate", kvl_cmd_generate, "generate text from a prompt"},
    {"ingest", kvl_cmd_ingest, "send documents to a running kvloomd (POST /v1/documents)"},
    {"ask", kvl_cmd_ask, "ask a question over ingested documents (POST /v1/generate)"},
    {"blend-eval", kvl_cmd_blend_eval, "CacheBlend quality vs full prefill on cached chunks (JSON)"},
    {"blend-bench", kvl_cmd_blend_bench, "CacheBlend vs full prefill timing on a synthetic model"},
    {"codec-eval", kvl_cmd_codec_eval, "measure the KV codec (size, KL, top-1) on a token file"},
    {"codec-profile", kvl_cmd_codec_profile, "build a model's codec probability profile from calibration KV"},
    {"gpu-bench", kvl_cmd_gpu_bench, "prefill / selective recompute / decode timings on the CUDA backend"},
};

static int usage(FILE *f) {
    fprintf(f, "usage: kvloom <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) fprintf(f, "  %-12s %s\n", cmds[i].name, cmds[i].help);
    return f == stdout ? 0 : 2;
}

int main(int argc, char **argv) {
    if (argc < 2) return usage(stderr);
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) return usage(stdout);
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (strcmp(argv[1], cmds[i].name) == 0) return cmds[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "kvloom: unknown command '%s'\n", argv[1]);
    return usage(stderr);
}
