#!/usr/bin/env python3
"""make_gguf_corpus.py - writes the committed GGUF fuzz corpus (tests/fuzz/corpus/gguf/).

One small file per corruption class the reader must reject, plus small valid files, so the fuzzer
starts from every branch of the parser. The tiny valid model (valid_tiny_model.gguf) comes from
folio-mkmodel; see tools/make_gguf_corpus.sh, which runs this script and then folio-mkmodel.
Usage: make_gguf_corpus.py OUTDIR"""
import os
import struct
import sys

F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)


def s(x):
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def header(n_tensors, n_kv, version=3, magic=b"GGUF"):
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv(key, t, payload):
    return s(key) + struct.pack("<I", t) + payload


def tensor(name, ne, t, off):
    return s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<q", n) for n in ne) + struct.pack("<IQ", t, off)


def pad(b, a=32):
    return b + b"\0" * (-len(b) % a)


def arr(t, fmt, vals):
    return struct.pack("<IQ", t, len(vals)) + b"".join(struct.pack(fmt, v) for v in vals)


def arr_str(vals):
    return struct.pack("<IQ", T_STR, len(vals)) + b"".join(s(v) for v in vals)


def valid_small():
    kvs = [
        kv("general.architecture", T_STR, s("llama")),
        kv("llama.block_count", T_U32, struct.pack("<I", 1)),
        kv("t.u8", T_U8, b"\x07"), kv("t.i8", T_I8, b"\xf9"), kv("t.u16", T_U16, struct.pack("<H", 7)),
        kv("t.i16", T_I16, struct.pack("<h", -7)), kv("t.i32", T_I32, struct.pack("<i", -7)),
        kv("t.f32", T_F32, struct.pack("<f", 0.5)), kv("t.bool", T_BOOL, b"\x01"),
        kv("t.u64", T_U64, struct.pack("<Q", 7)), kv("t.i64", T_I64, struct.pack("<q", -7)),
        kv("t.f64", T_F64, struct.pack("<d", 0.25)),
        kv("tokenizer.ggml.tokens", T_ARR, arr_str(["<|endoftext|>", "a", "b", "ab", "\u0120"])),
        kv("tokenizer.ggml.token_type", T_ARR, arr(T_I32, "<i", [3, 1, 1, 1, 1])),
        kv("t.arr_f32", T_ARR, arr(T_F32, "<f", [1.0, 2.0])),
    ]
    tens = [("a.f32", [4, 2], F32, 32), ("b.q4_0", [32, 1], Q4_0, 18), ("c.q8_0", [32, 2], Q8_0, 68),
            ("d.f16", [8], F16, 16), ("e.bf16", [2, 2, 2, 2], BF16, 32), ("f.q4_1", [32], Q4_1, 20)]
    infos, off = b"", 0
    for name, ne, t, nbytes in tens:
        infos += tensor(name, ne, t, off)
        off += nbytes + (-nbytes % 32)
    body = pad(header(len(tens), len(kvs)) + b"".join(kvs) + infos)
    data = b""
    for i, (_, _, _, nbytes) in enumerate(tens):
        data += pad(bytes((i * 37 + k) % 251 for k in range(nbytes)))
    return body + data


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fuzz/corpus/gguf"
    os.makedirs(out, exist_ok=True)
    one_f32 = lambda name="w", ne=(4,), t=F32, off=0, extra=64: pad(header(1, 0) + tensor(name, list(ne), t, off)) + b"\0" * extra
    files = {
        "valid_small.gguf": valid_small(),
        "valid_empty_v2.gguf": header(0, 0, version=2),
        "valid_alignment_64.gguf": pad(header(1, 1) + kv("general.alignment", T_U32, struct.pack("<I", 64))
                                       + tensor("w", [4], F32, 0), 64) + b"\0" * 16,
        "bad_truncated_header.gguf": header(0, 0)[:13],
        "bad_magic.gguf": header(0, 0, magic=b"GGML"),
        "bad_version_1.gguf": header(0, 0, version=1),
        "bad_version_4.gguf": header(0, 0, version=4),
        "bad_big_endian.gguf": header(0, 0, version=0x03000000),
        "bad_huge_tensor_count.gguf": header(2**64 - 1, 0),
        "bad_huge_kv_count.gguf": header(0, 2**62),
        "bad_huge_array_count.gguf": header(0, 1) + kv("a", T_ARR, struct.pack("<IQ", T_U64, 2**62)),
        "bad_string_past_end.gguf": header(0, 1) + s("general.name") + struct.pack("<IQ", T_STR, 1000) + b"abc",
        "bad_key_length_huge.gguf": header(0, 1) + struct.pack("<Q", 2**64 - 1) + b"\0" * 16,
        "bad_string_array_elem.gguf": header(0, 1) + kv("tok", T_ARR, struct.pack("<IQ", T_STR, 2) + s("ok")
                                                        + struct.pack("<Q", 99)) + b"\0" * 8,
        "bad_unknown_value_type.gguf": header(0, 1) + kv("my.key", 13, b"\0" * 8),
        "bad_unknown_array_type.gguf": header(0, 1) + kv("my.arr", T_ARR, struct.pack("<IQ", 99, 1)) + b"\0" * 8,
        "bad_nested_array.gguf": header(0, 1) + kv("nested", T_ARR, struct.pack("<IQ", T_ARR, 1) + arr(T_U8, "<B", [1])),
        "bad_bool_value.gguf": header(0, 1) + kv("flag", T_BOOL, b"\x02") + b"\0" * 16,
        "bad_duplicate_key.gguf": header(0, 2) + kv("k", T_U32, struct.pack("<I", 1)) + kv("k", T_U32, struct.pack("<I", 2)),
        "bad_empty_key.gguf": header(0, 1) + kv("", T_U32, struct.pack("<I", 1)) + b"\0" * 16,
        "bad_alignment_zero.gguf": header(0, 1) + kv("general.alignment", T_U32, struct.pack("<I", 0)),
        "bad_alignment_3.gguf": header(0, 1) + kv("general.alignment", T_U32, struct.pack("<I", 3)),
        "bad_alignment_type.gguf": header(0, 1) + kv("general.alignment", T_STR, s("32")),
        "bad_offset_past_end.gguf": pad(header(1, 0) + tensor("blk.3.attn_q.weight", [8, 4], F32, 0)) + b"\0" * 127,
        "bad_offset_overflow.gguf": one_f32(off=2**64 - 32),
        "bad_offset_misaligned.gguf": one_f32(off=16),
        "bad_ne_overflow.gguf": one_f32(ne=(2**32, 2**32)),
        "bad_nbytes_overflow.gguf": one_f32(ne=(2**40, 2**22)),
        "bad_ne_negative.gguf": one_f32(ne=(4, -1)),
        "bad_n_dims_0.gguf": pad(header(1, 0) + s("w") + struct.pack("<IIQ", 0, F32, 0)) + b"\0" * 64,
        "bad_n_dims_5.gguf": one_f32(ne=(1, 1, 1, 1, 1)),
        "bad_block_multiple.gguf": one_f32(ne=(33,), t=Q4_0),
        "bad_unknown_tensor_type.gguf": one_f32(ne=(32,), t=77),
        "bad_removed_tensor_type.gguf": one_f32(ne=(32,), t=4),
        "bad_duplicate_tensor.gguf": pad(header(2, 0) + tensor("w", [8], F32, 0) + tensor("w", [8], F32, 32)) + b"\0" * 64,
        "bad_tensor_name_past_end.gguf": header(1, 0) + struct.pack("<Q", 500) + b"w" * 40,
        "kquant_q4_k.gguf": one_f32(ne=(256,), t=12, extra=144),
    }
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(files)} files to {out}")


if __name__ == "__main__":
    main()
