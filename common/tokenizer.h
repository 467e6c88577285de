/* tokenizer.h - the byte-level BPE (GPT-2 family) and SentencePiece (Llama 2, Mistral, Phi-3, Gemma)
 * tokenizers, reproducing llama.cpp's tokenization, token-to-text decoding (whole arrays and a
 * streaming UTF-8 decoder) and chat templates (the last in common/chat_template.c).
 *
 * A tok_t is immutable after tok_new/tok_new_from_gguf and may be shared by any number of threads;
 * everything it needs is copied in (it borrows nothing from the desc or the gguf_t). Encoding follows
 * llama.cpp step by step: special tokens written in the text are split out first (longest first).
 * BPE: the rest is cut into words by the pre-tokenizer of tokenizer.ggml.pre, each word's bytes are
 * mapped through GPT-2's bytes_to_unicode and merged by BPE rank. SentencePiece: each piece of text
 * (after a space when it starts the text or follows a special token, if add_space_prefix) has its
 * spaces written as U+2581, and adjacent pieces are merged while the vocab has the joined text,
 * highest score first; a character not in the vocab becomes its <0xXX> byte tokens. Functions that produce text or ids return
 * how many they produced; when that is more than the caller's capacity they write what fits and
 * return the full count, so a caller can size a buffer and call again. */
#ifndef FOLIO_TOKENIZER_H
#define FOLIO_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "gguf.h"

/* tokenizer.ggml.token_type values (llama.cpp's llama_token_type). */
typedef enum {
    TOK_TYPE_UNDEFINED = 0,
    TOK_TYPE_NORMAL = 1,
    TOK_TYPE_UNKNOWN = 2,
    TOK_TYPE_CONTROL = 3,
    TOK_TYPE_USER_DEFINED = 4,
    TOK_TYPE_UNUSED = 5,
    TOK_TYPE_BYTE = 6,
} tok_type_t;

/* Everything a tokenizer is built from, as plain arrays (borrowed for the duration of tok_new). */
typedef struct tok_desc {
    int32_t n_vocab;
    const char *const *tokens;   /* n_vocab strings: BPE in GPT-2's byte-level spelling, SentencePiece as is */
    const size_t *token_lens;    /* lengths of tokens[i]; NULL: NUL-terminated */
    const int32_t *token_types;  /* n_vocab tok_type_t values; NULL: all NORMAL */
    int32_t n_merges;
    const char *const *merges;   /* "left right", rank = index */
    const size_t *merge_lens;    /* NULL: NUL-terminated */
    const char *pre;             /* tokenizer.ggml.pre (pretokenizer.h lists them); NULL: "default" */
    int32_t bos_id, eos_id, unk_id, pad_id; /* -1 when absent */
    bool add_bos;
    bool spm;                    /* SentencePiece (tokenizer.ggml.model "llama"); false: byte-level BPE */
    const float *scores;         /* SentencePiece: n_vocab merge scores (higher merges first); NULL: all 0 */
    bool add_space_prefix;       /* SentencePiece: a space before text that starts or follows a special token */
    bool special_rstrip;         /* special tokens eat the whitespace after them (llama.cpp's rule for Phi-3) */
    const char *chat_template;   /* NULL when absent */
    size_t chat_template_len;    /* 0: NUL-terminated */
} tok_desc_t;

typedef struct tok tok_t;

tok_t *tok_new(const tok_desc_t *desc, fl_error_t *err);
/* Reads tokenizer.ggml.{model,pre,tokens,token_type,merges,scores,*_token_id,add_bos_token,
 * add_space_prefix} and tokenizer.chat_template. tokenizer.ggml.model "gpt2" (byte-level BPE) and
 * "llama" (SentencePiece) are supported, with llama.cpp's defaults for keys that are absent. */
tok_t *tok_new_from_gguf(const gguf_t *g, fl_error_t *err);
void tok_destroy(tok_t **tp);

/* Encodes text[0..len) into out[0..cap). add_bos: put the BOS token first (callers normally pass
 * tok_add_bos(t)). parse_special: control tokens written in the text ("<|im_start|>") become their
 * ids; user-defined tokens always do, as in llama.cpp. Returns the number of tokens (if more than cap,
 * only cap are written), FL_EINVAL for bad arguments, FL_ERANGE if len > INT32_MAX/2, FL_ENOMEM. */
int tok_encode(const tok_t *t, const char *text, size_t len, bool add_bos, bool parse_special, int32_t *out,
               int cap);

/* A byte range [off, off + len) of a text. */
typedef struct {
    size_t off, len;
} tok_span_t;

/* tok_encode with parse_special true except inside plain[0..n_plain) (sorted, disjoint, none empty):
 * a control token is split out only where its text lies wholly outside every plain span, so text a
 * user wrote (chat message contents) cannot forge the markers around it. Pre-tokenization and BPE
 * run across span edges as if there were none, so text without control-token spellings in its spans
 * encodes exactly as with tok_encode(..., true, ...). FL_EINVAL also for malformed spans. */
int tok_encode_plain_spans(const tok_t *t, const char *text, size_t len, bool add_bos, const tok_span_t *plain,
                           int n_plain, int32_t *out, int cap);

/* The bytes token id stands for, as llama.cpp's token_to_piece: normal tokens decode their byte-level
 * spelling (SentencePiece: U+2581 becomes a space); SentencePiece byte tokens <0xXX> give their byte;
 * user-defined tokens give their text; control and unknown tokens give their text only when special
 * is true, else nothing; other types give nothing. Returns the length (written only if it
 * fits in cap; the output is not NUL-terminated) or FL_EINVAL for an id out of range. */
int tok_token_bytes(const tok_t *t, int32_t id, bool special, char *buf, size_t cap);

/* Concatenated tok_token_bytes of ids[0..n): may end inside a UTF-8 character. Returns the total
 * length (written only up to cap) or FL_EINVAL. */
int tok_decode(const tok_t *t, const int32_t *ids, int n, bool special, char *out, size_t cap);

/* Streaming decoder for generated tokens: tok_stream_push returns only complete UTF-8 characters and
 * holds back an incomplete trailing sequence (at most 3 bytes) until later bytes complete it; bytes
 * that cannot start or continue a valid character come out as U+FFFD. */
typedef struct tok_stream {
    bool special;           /* passed to tok_token_bytes */
    int n_pending;
    unsigned char pending[4];
} tok_stream_t;

void tok_stream_init(tok_stream_t *s, bool special);
/* Writes the decoded text to out and returns its length, or FL_ERANGE (state unchanged) when cap is
 * smaller than needed; tok_max_token_len(t) * 3 + 16 bytes are always enough. FL_EINVAL for bad id. */
int tok_stream_push(tok_stream_t *s, const tok_t *t, int32_t id, char *out, size_t cap);
/* Emits the held-back bytes, each as U+FFFD (they never became a whole character), and resets the
 * stream. Returns the length or FL_ERANGE; 16 bytes are always enough. */
int tok_stream_flush(tok_stream_t *s, char *out, size_t cap);

int32_t tok_n_vocab(const tok_t *t);
int32_t tok_bos(const tok_t *t); /* -1 when absent */
int32_t tok_eos(const tok_t *t);
int32_t tok_unk(const tok_t *t);
int32_t tok_pad(const tok_t *t);
bool tok_add_bos(const tok_t *t);
size_t tok_max_token_len(const tok_t *t); /* longest tok_token_bytes output */
const char *tok_pre(const tok_t *t);      /* pre-tokenizer name, as given */
/* End of generation: eos plus, as llama.cpp, any of "<|endoftext|>", "<|im_end|>", "<|eot_id|>",
 * "<|end|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>", "<EOT>", ... present in the vocab. */
bool tok_is_eog(const tok_t *t, int32_t id);
bool tok_is_control(const tok_t *t, int32_t id);
tok_type_t tok_type(const tok_t *t, int32_t id); /* llama.cpp may promote EOG tokens to CONTROL */
/* The stored vocab string (byte-level spelling), NUL-terminated, borrowed; NULL for a bad id. */
const char *tok_piece(const tok_t *t, int32_t id);
/* Id of the token spelled exactly s[0..len) (byte-level spelling), or -1. */
int32_t tok_find(const tok_t *t, const char *s, size_t len);
/* The chat template read from the model, or NULL. */
const char *tok_chat_template(const tok_t *t);

/* Chat templates (common/chat_template.c), rendered as llama.cpp's llama_chat_apply_template renders
 * the family it detects in the template's text: ChatML ("<|im_start|>role\ncontent<|im_end|>\n", and
 * "<|im_start|>assistant\n" if add_generation_prompt; Phi-4's and SmolVLM's variants), Mistral's
 * [INST] formats (v1, v3, v3-tekken, v7) and Llama 2's, Phi-3, Gemma, Command-R and Llama 3 (no BOS
 * text: the tokenizer adds BOS). One addition: a default system message that a ChatML template
 * inserts when messages[0] is not 'system' is parsed from the template text and written as the
 * template would. Returns the length (written, NUL-terminated, only if it fits: cap must exceed the
 * length), FL_EINVAL for bad arguments, FL_EUNSUPPORTED for no or an unknown template. */
typedef struct {
    const char *role;
    const char *content;
} tok_chat_msg_t;

int tok_chat_apply(const tok_t *t, const tok_chat_msg_t *msgs, int n, bool add_generation_prompt, char *out,
                   size_t cap);
/* 0 when tok_chat_apply can render this model's template, else FL_EUNSUPPORTED with a message saying
 * why (no template, or one of a family folio does not render). */
int tok_chat_supported(const tok_t *t, fl_error_t *err);

/* The token ids a prompt feeds the model, as `folioctl run` and the coordinator build them. With
 * n_msgs == 0, text[0..len) is a raw completion: the model's own BOS policy, no template, and the
 * special tokens written in the text become their ids (as llama.cpp and Hugging Face tokenize a raw
 * prompt) unless plain_text. With n_msgs > 0 the chat template is applied to msgs with the
 * assistant's turn opened (text and plain_text are ignored): the markers the template writes become
 * their ids, the messages' roles and contents are always plain text (tok_encode_plain_spans), so a
 * user cannot forge a turn. *ids (capacity *cap, both may start NULL/0) is grown with realloc as
 * needed and stays the caller's to free. Returns the number of tokens, or a negative FL_E* code with
 * a message in err. */
int tok_encode_prompt(const tok_t *t, const char *text, size_t len, bool plain_text, const tok_chat_msg_t *msgs,
                      int n_msgs, int32_t **ids, int *cap, fl_error_t *err);

#endif
