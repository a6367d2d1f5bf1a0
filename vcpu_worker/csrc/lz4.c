/* LZ4 "legacy" frame decompression, so Linux bzImages are unpacked on the host.
 *
 * Format: magic 0x184C2102, then blocks of (u32 little-endian compressed
 * size, LZ4 block), each decompressing to at most 8 MiB.  A size that reads
 * as the magic again starts a new frame (the kernel appends frames).
 * Every read and write is bounds-checked: the input is an untrusted file.
 */
#include <stdint.h>
#include <string.h>

#define HV_LZ4_LEGACY_MAGIC 0x184C2102u

static uint32_t hv_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* One LZ4 block; returns bytes written or -1 on malformed input. */
static long hv_lz4_block(const uint8_t *src, size_t n, uint8_t *dst, size_t cap)
{
    size_t ip = 0, op = 0;
    while (ip < n) {
        uint8_t token = src[ip++];
        size_t lit = token >> 4;
        if (lit == 15) {
            uint8_t b;
            do {
                if (ip >= n) return -1;
                b = src[ip++];
                lit += b;
            } while (b == 255);
        }
        if (lit > n - ip || lit > cap - op) return -1;
        memcpy(dst + op, src + ip, lit);
        ip += lit;
        op += lit;
        if (ip == n) break;               /* last sequence has no match */
        if (n - ip < 2) return -1;
        size_t off = (size_t)src[ip] | (size_t)src[ip + 1] << 8;
        ip += 2;
        if (off == 0 || off > op) return -1;
        size_t mlen = token & 15;
        if (mlen == 15) {
            uint8_t b;
            do {
                if (ip >= n) return -1;
                b = src[ip++];
                mlen += b;
            } while (b == 255);
        }
        mlen += 4;
        if (mlen > cap - op) return -1;
        const uint8_t *m = dst + op - off;
        if (off >= mlen) {
            memcpy(dst + op, m, mlen);
        } else {
            for (size_t i = 0; i < mlen; i++) dst[op + i] = m[i];
        }
        op += mlen;
    }
    return (long)op;
}

/* Whole legacy stream; returns decompressed size, -1 malformed, -2 too big. */
long hv_lz4_legacy_decompress(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap)
{
    size_t ip = 0, op = 0;
    if (src_len < 4 || hv_le32(src) != HV_LZ4_LEGACY_MAGIC) return -1;
    ip = 4;
    while (src_len - ip >= 4) {
        uint32_t bsize = hv_le32(src + ip);
        ip += 4;
        if (bsize == HV_LZ4_LEGACY_MAGIC) continue;
        if (bsize == 0 || bsize > src_len - ip) break;   /* trailing size field / padding */
        size_t room = dst_cap - op;
        if (room == 0) return -2;
        long got = hv_lz4_block(src + ip, bsize, dst + op, room);
        if (got < 0) return room < (8u << 20) ? -2 : -1;
        ip += bsize;
        op += (size_t)got;
    }
    return (long)op;
}
