// Fuzz target: the conversation-file reader (strict JSON) and the instruct
// format, with the tokenizer of MIXTRAL_FUZZ_MODEL.
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const Tokenizer *t = fuzz_tokenizer();
    Conversation conv;
    if (chat_parse((const char *)data, size, &conv)) return 0;
    IdList ids = {0};
    chat_format(&ids, t, 1, 2, &conv);
    free(ids.ids);
    chat_free(&conv);
    return 0;
}
