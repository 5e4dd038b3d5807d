"""Guest ABI v2 numbers and the guest-physical memory layout (docs/guest-abi.md).

appliance/guest/lib/abi.h is the C side of the same contract.
"""

import struct

ABI_VERSION = 2
BOOT_MAGIC = 0x4F4C4F43  # "COLO"

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20
MAX_RAM = 3 << 30  # below 0xfffbd000, where KVM_SET_TSS_ADDR puts the VMX TSS

# Guest-physical layout: page 0 is left unmapped so null pointers fault.
GDT_GPA = 0x1000
TSS_GPA = 0x1800
PML4_GPA = 0x2000
PDPT_GPA = 0x3000
PD_GPA = 0x4000  # four page directories: 0x4000-0x7fff
PT0_GPA = 0x8000  # 4 KiB pages for the first 2 MiB
BOOT_INFO_GPA = 0x9000
CLOCK_GPA = 0xA000  # the clock page: monotonic time from the TSC without an exit
STACK_BOTTOM = 0x20000
STACK_TOP = 0x100000
IMAGE_BASE = 0x100000

# struct abi_boot_info: magic, abi_version, ram_size, heap_start, heap_end,
# stack_top, tsc_khz, disk_sectors, mac[6], nic_present, reserved, cmdline[4032]
BOOT_INFO = struct.Struct("<IIQQQQQQ6sBB4032s")
CMDLINE_MAX = 4032

HYPERCALL_PORT_BASE = 0x500  # ports 0x500-0x5ff are reserved for hypercalls
HC_CONSOLE_WRITE = 0x500
HC_TIME = 0x501
HC_POLL = 0x502
HC_NET_WRITE_V1 = 0x503  # guest ABI v1 only: refused with a clear reason
HC_NET_READ_V1 = 0x504
HC_BLOCK_READ = 0x505
HC_BLOCK_WRITE = 0x506
HC_HALT = 0x507
HC_NET_SETUP = 0x508
HC_NET_DOORBELL = 0x509  # an ioeventfd: the write wakes the NIC thread without an exit
HC_NET_WAIT_TX = 0x50A
HC_CONSOLE_SETUP = 0x50B
HC_CONSOLE_DOORBELL = 0x50C  # an ioeventfd: wakes the console thread without an exit

# Argument structs, all little-endian u64 fields.
HC_CONSOLE_WRITE_ARGS = struct.Struct("<QQ")  # data, len
HC_TIME_ARGS = struct.Struct("<QQ")  # out: monotonic_ns, wall_ns
HC_POLL_ARGS = struct.Struct("<QQ")  # deadline_ns, out: ready
HC_NET_SETUP_ARGS = struct.Struct("<QQQQQq")  # ctrl, tx_ring, tx_size, rx_ring, rx_size, out: ret
HC_CONSOLE_SETUP_ARGS = struct.Struct("<QQQq")  # ctrl, data, size, out: ret
# The console ring's control block: u32 prod at +0 (guest), u32 cons at +64 (host).
CONSOLE_CTRL_SIZE = 128
CONSOLE_PROD = 0
CONSOLE_CONS = 64
CONSOLE_RING_MIN, CONSOLE_RING_MAX = 64, 1 << 20
# The clock page: generation (changes whenever the vCPU starts running), mult = 2**32 * 10**6 / tsc_khz.
CLOCK_PAGE = struct.Struct("<QQ")
HC_BLOCK_ARGS = struct.Struct("<QQQq")  # sector, data, count, out: ret
HC_HALT_ARGS = struct.Struct("<Q")  # status

SECTOR_SIZE = 512
