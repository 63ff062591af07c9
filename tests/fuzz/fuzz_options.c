// Fuzz target: the command line. The input is split at NUL bytes into
// arguments (at most 64) after argv[0]; parse_options either accepts them or
// refuses with an error, never crashes.
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int quiet;
    if (!quiet) { freopen("/dev/null", "w", stdout); freopen("/dev/null", "w", stderr); quiet = 1; }
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = 0;
    char *argv[66] = {"mixtral"};
    int argc = 1;
    for (char *p = text; p <= text + size && argc < 65; p += strlen(p) + 1) argv[argc++] = p;
    argv[argc] = NULL;
    static Options o;
    if (!setjmp(die_jump)) parse_options(argc, argv, &o);
    free(o.run.stop);
    o.run.stop = NULL;
    free(text);
    return 0;
}
