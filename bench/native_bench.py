"""Benchmark of the native hot paths against memcmp and the pure-Python references.

    python bench/native_bench.py                 # table on stdout
    python bench/native_bench.py --markdown      # the "## Native hot paths" section
    python bench/native_bench.py --write docs/benchmarks.md   # replace that section in place

Scans are reported in GB/s of guest RAM covered (one buffer's bytes per second,
also for the two-buffer compares), XBZRLE in pages per second.  Every figure is
the best of several runs, so it shows the code rather than the machine's noise.
"""
import argparse
import os
import struct
import sys
import time
from array import array

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from native import _native, reference  # noqa: E402
from netfilter.compare import PyComparer  # noqa: E402
from report import machine, write_section  # noqa: E402

PAGE = 4096
HEADING = "## Native hot paths"


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def best_times_interleaved(fns: dict, repeat: int) -> dict:
    """Best time of each function, run in turns so that load from other processes
    on the machine hits them alike and their ratios stay fair."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            best[name] = min(best[name], best_time(fn, 1))
    return best


def gbps(nbytes: int, fn, repeat: int) -> float:
    return nbytes / best_time(fn, repeat) / 1e9


def per_second(fn, calls: int, repeat: int) -> float:
    def loop():
        for _ in range(calls):
            fn()
    return calls / best_time(loop, repeat)


def resident(size: int) -> bytearray:
    """A zero buffer whose pages are really allocated: calloc'ed memory would read
    from the kernel's single shared zero page and flatter every scan."""
    buf = bytearray(size)
    buf[::PAGE] = b"\x01" * (size // PAGE)
    buf[::PAGE] = bytes(size // PAGE)
    return buf


def typical_pages() -> tuple[bytes, bytes]:
    """A page of random data and its successor with three small writes."""
    old = os.urandom(PAGE)
    new = bytearray(old)
    for offset, length in ((64, 1), (1500, 4), (3000, 8)):
        new[offset:offset + length] = bytes(b ^ 0xFF for b in new[offset:offset + length])
    return old, bytes(new)


def tcp_segment(seq: int, flags: int, payload: bytes = b"") -> bytes:
    """A guest's TCP segment to a client (checksums left zero: the comparer ignores them)."""
    tcp = struct.pack("!HHIIBBHHH", 6379, 40000, seq, 777, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, bytes([10, 9, 0, 2]),
                     bytes([10, 9, 0, 1]))
    return bytes(6) + bytes(6) + b"\x08\x00" + ip + tcp


def comparer_pairs_per_second(comparer_class, pairs: int, repeat: int) -> float:
    """A matching TCP stream of 100-byte segments, each sent by the PVM then by the SVM (already
    rewritten), through a fresh comparer: pairs compared and released per second."""
    segments = [tcp_segment((1001 + 100 * i) & 0xFFFFFFFF, 0x18, bytes(100)) for i in range(pairs)]

    def run():
        released = []
        comparer = comparer_class(released.append, print)
        comparer.primary(tcp_segment(1000, 0x12))       # SYN-ACKs: the stream starts matched
        comparer.secondary(tcp_segment(5, 0x12))
        for segment in segments:
            comparer.primary(segment)
            comparer.secondary(segment)
        assert len(released) == pairs + 1
    return pairs / best_time(run, repeat)


def measure(size_mib: int, ref_size_mib: int) -> list[tuple]:
    """Rows of (operation, unit, native, reference or None, memcmp baseline or None)."""
    size, ref_size = size_mib << 20, ref_size_mib << 20
    zeros = resident(size)
    ram = bytearray(os.urandom(size))
    shadow = bytearray(ram)  # equal: every page is compared to its end
    scans = best_times_interleaved({
        "memcmp": lambda: _native.memcmp_bandwidth_probe(ram, shadow, PAGE),
        "zero": lambda: _native.zero_pages(zeros, PAGE),
        "changed": lambda: _native.changed_pages(ram, shadow, PAGE),
    }, 15)
    memcmp = size / scans["memcmp"] / 1e9
    small_zeros, small_ram, small_shadow = zeros[:ref_size], ram[:ref_size], shadow[:ref_size]
    rows = [
        ("memcmp every page (baseline)", "GB/s", memcmp, None, memcmp),
        ("zero_pages, all-zero RAM", "GB/s", size / scans["zero"] / 1e9,
         gbps(ref_size, lambda: reference.zero_pages(small_zeros, PAGE), 3), memcmp),
        ("changed_pages, unchanged RAM", "GB/s", size / scans["changed"] / 1e9,
         gbps(ref_size, lambda: reference.changed_pages(small_ram, small_shadow, PAGE), 3), memcmp),
    ]
    # Gather every 4th page into a send buffer; bitmap of the same pages.
    numbers = array("Q", range(0, size // PAGE, 4))
    small_numbers = array("Q", range(0, ref_size // PAGE, 4))
    out = bytearray(len(numbers) * PAGE)
    rows.append(("gather_pages, every 4th page", "GB/s",
                 gbps(len(out), lambda: _native.gather_pages(ram, numbers, PAGE, out), 5),
                 gbps(len(small_numbers) * PAGE,
                      lambda: reference.gather_pages(small_ram, small_numbers, PAGE, out), 3), None))
    bitmap = bytes([0x11]) * (size // PAGE // 8)
    rows.append(("bitmap_pages, 1/4 of pages dirty", "Mpages/s",
                 len(numbers) / best_time(lambda: _native.bitmap_pages(bitmap), 5) / 1e6,
                 len(numbers) / best_time(lambda: reference.bitmap_pages(bitmap), 1) / 1e6, None))
    old, new = typical_pages()
    encoded = _native.xbzrle_encode(old, new, PAGE)
    assert encoded == reference.xbzrle_encode(old, new, PAGE)
    rows.append(("xbzrle_encode, 3 small writes", "pages/s",
                 per_second(lambda: _native.xbzrle_encode(old, new, PAGE), 200_000, 5),
                 per_second(lambda: reference.xbzrle_encode(old, new, PAGE), 20_000, 3), None))
    rows.append(("xbzrle_decode, 3 small writes", "pages/s",
                 per_second(lambda: _native.xbzrle_decode(encoded, old), 200_000, 5),
                 per_second(lambda: reference.xbzrle_decode(encoded, old), 20_000, 3), None))
    rows.append(("COLO comparer, matching TCP segment pairs", "pairs/s",
                 comparer_pairs_per_second(_native.Comparer, 100_000, 5),
                 comparer_pairs_per_second(PyComparer, 10_000, 3), None))
    return rows


def figure(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e4:
        return f"{value / 1e3:.0f} k"
    return f"{value:.2f}"


def ratio(value: float) -> str:
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"


def table(rows) -> list[list[str]]:
    lines = [["operation", "unit", "native", "reference", "native / memcmp", "native / reference"]]
    for name, unit, nat, ref, base in rows:
        lines.append([name, unit, figure(nat), figure(ref) if ref else "",
                      f"{nat / base:.2f}" if base and ref is not None else "",
                      ratio(nat / ref) if ref else ""])
    return lines


def markdown(rows, size_mib: int, ref_size_mib: int) -> str:
    lines = table(rows)
    out = [HEADING, "",
           f"`bench/native_bench.py` on {machine()}, {time.strftime('%Y-%m-%d', time.gmtime())}.",
           f"Native scans run over {size_mib} MiB, the pure-Python references over {ref_size_mib} MiB;",
           "GB/s counts guest RAM covered per second (one buffer, also for the two-buffer compares);",
           "`memcmp` is `_native.memcmp_bandwidth_probe`, one `memcmp` per 4 KiB page pair, as the",
           "baseline. Best of several runs.", "",
           "| " + " | ".join(lines[0]) + " |",
           "|" + "|".join(["---"] * 2 + ["---:"] * 4) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the Markdown section")
    parser.add_argument("--write", metavar="PATH", help="replace the section in this Markdown file")
    parser.add_argument("--size-mib", type=int, default=256, help="buffer for the native scans")
    parser.add_argument("--ref-size-mib", type=int, default=16, help="buffer for the references")
    args = parser.parse_args()
    rows = measure(args.size_mib, args.ref_size_mib)
    section = markdown(rows, args.size_mib, args.ref_size_mib)
    if args.write:
        write_section(args.write, HEADING, section)
    if args.markdown:
        print(section, end="")
    else:
        lines = table(rows)
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        for line in lines:
            print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))


if __name__ == "__main__":
    main()
