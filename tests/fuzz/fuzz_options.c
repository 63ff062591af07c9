// Fuzz target: the command line. The input is split at NUL bytes into
// arguments (at most 64) after argv[0]; parse_options either accepts them or
// refuses with an error, never crashes.
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    // the usage and --version go to stdout and stderr: to /dev/null while parsing (libFuzzer
    // reports on stderr, so it is restored after)
    static int devnull = -1, saved_out, saved_err;
    if (devnull < 0) { devnull = open("/dev/null", O_WRONLY); saved_out = dup(1); saved_err = dup(2); }
    fflush(stdout);
    fflush(stderr);
    dup2(devnull, 1);
    dup2(devnull, 2);
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
    fflush(stdout);
    fflush(stderr);
    dup2(saved_out, 1);
    dup2(saved_err, 2);
    return 0;
}
