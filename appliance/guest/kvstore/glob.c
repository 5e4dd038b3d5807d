/* Glob patterns as Redis's stringmatchlen reads them: * ? [abc] [^a-z] \x.
 * Used by KEYS, SCAN MATCH and CONFIG GET. */
#include "kvstore.h"

static uint8_t fold(uint8_t c, bool nocase)
{
    return nocase && c >= 'A' && c <= 'Z' ? (uint8_t)(c + 32) : c;
}

/* Matches one pattern element other than '*' at *pp against c, moving *pp past it. */
static bool match_element(const uint8_t **pp, const uint8_t *end, uint8_t c, bool nocase)
{
    const uint8_t *p = *pp;
    bool ok;
    c = fold(c, nocase);
    if (*p == '?') {
        ok = true;
        p++;
    } else if (*p == '[') {
        p++;
        bool negate = p < end && *p == '^', hit = false;
        p += negate;
        while (p < end && *p != ']') {
            if (*p == '\\' && end - p >= 2) {
                hit |= fold(p[1], nocase) == c;
                p += 2;
            } else if (end - p >= 3 && p[1] == '-') {
                uint8_t lo = fold(p[0], nocase), hi = fold(p[2], nocase);
                if (lo > hi) {
                    uint8_t t = lo;
                    lo = hi, hi = t;
                }
                hit |= c >= lo && c <= hi;
                p += 3;
            } else {
                hit |= fold(*p, nocase) == c;
                p++;
            }
        }
        p += p < end; /* the ']'; an unclosed class ends with the pattern */
        ok = hit != negate;
    } else if (*p == '\\' && end - p >= 2) {
        ok = fold(p[1], nocase) == c;
        p += 2;
    } else {
        ok = fold(*p, nocase) == c;
        p++;
    }
    *pp = p;
    return ok;
}

/* Iterative glob: on a mismatch, retry from the last '*' one byte further,
 * so no pattern takes more than O(pattern * string) steps. */
bool glob_match(const uint8_t *pat, size_t plen, const uint8_t *s, size_t slen, bool nocase)
{
    const uint8_t *p = pat, *pend = pat + plen, *send = s + slen;
    const uint8_t *star_p = NULL, *star_s = NULL;
    while (s < send) {
        if (p < pend && *p == '*') {
            while (p < pend && *p == '*')
                p++;
            if (p == pend)
                return true;
            star_p = p;
            star_s = s;
            continue;
        }
        const uint8_t *q = p;
        if (p < pend && match_element(&q, pend, *s, nocase)) {
            p = q;
            s++;
        } else if (star_p) {
            p = star_p;
            s = ++star_s;
        } else {
            return false;
        }
    }
    while (p < pend && *p == '*')
        p++;
    return p == pend;
}
