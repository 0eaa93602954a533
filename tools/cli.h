/* cli.h - shared helpers of the kvloom command-line tools. */
#ifndef KVL_CLI_H
#define KVL_CLI_H

#include <stddef.h>
#include <stdint.h>

#include "kvl_engine.h"
#include "kvl_status.h"

/* Prints "kvloom <cmd>: error: STATUS: detail" to stderr; returns 1 (the exit code for failures). */
int kvl_cli_fail(const char *cmd, kvl_status s);
/* Prints a usage error and returns 2. */
int kvl_cli_usage(const char *cmd, const char *usage, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Reads an int32 little-endian file: *out malloc'ed (caller frees), *n its count. */
kvl_status kvl_cli_read_i32(const char *path, int32_t **out, int32_t *n);
/* Writes n bytes to path (created/truncated). */
kvl_status kvl_cli_write_file(const char *path, const void *data, size_t n);

/* Parses an integer / float argument with range checking; returns 0 on success. */
int kvl_cli_int(const char *s, long lo, long hi, long *out);
int kvl_cli_float(const char *s, double lo, double hi, double *out);

/* Loads a model with the CPU backend (or the GPU if $KVL_GPU is set and the build has it). */
kvl_status kvl_cli_load_model(const char *path, kvl_model **m);

/* Monotonic clock in milliseconds. */
double kvl_cli_now_ms(void);

#endif
