/*
 * Guest ABI v2 between unikernel guests and the appliance VMM.
 * docs/guest-abi.md is the reference; appliance/vmm/abi.py mirrors these numbers.
 * A hypercall is `outl(port, (uint32_t)gpa_of_argument_struct)`: the VMM reads the
 * struct from guest RAM, does the work and writes the outputs back before the
 * guest's next instruction runs.  All pointers are guest-physical (= virtual).
 */
#ifndef GUEST_ABI_H
#define GUEST_ABI_H

#include <stdint.h>

#define ABI_VERSION          2
#define ABI_BOOT_MAGIC       0x4f4c4f43u   /* "COLO" */
#define ABI_BOOT_INFO_GPA    0x9000u
#define ABI_CMDLINE_MAX      4032
#define ABI_CLOCK_GPA        0xa000u

struct abi_boot_info {
    uint32_t magic;
    uint32_t abi_version;
    uint64_t ram_size;
    uint64_t heap_start;
    uint64_t heap_end;
    uint64_t stack_top;
    uint64_t tsc_khz;          /* 0 when unknown */
    uint64_t disk_sectors;     /* 0 when there is no disk */
    uint8_t mac[6];
    uint8_t nic_present;
    uint8_t reserved;
    char cmdline[ABI_CMDLINE_MAX];   /* NUL-terminated */
};

#define HC_CONSOLE_WRITE 0x500
#define HC_TIME          0x501
#define HC_POLL          0x502
#define HC_BLOCK_READ    0x505
#define HC_BLOCK_WRITE   0x506
#define HC_HALT          0x507
#define HC_NET_SETUP     0x508
#define HC_NET_DOORBELL  0x509   /* an ioeventfd: no exit */
#define HC_NET_WAIT_TX   0x50a
#define HC_CONSOLE_SETUP    0x50b
#define HC_CONSOLE_DOORBELL 0x50c   /* an ioeventfd: no exit */

struct hc_console_write { uint64_t data; uint64_t len; };
struct hc_time { uint64_t monotonic_ns; uint64_t wall_ns; };            /* out */
struct hc_poll { uint64_t deadline_ns; uint64_t ready; };               /* ready: out */
struct hc_net_setup { uint64_t ctrl; uint64_t tx_ring; uint64_t tx_size;
                      uint64_t rx_ring; uint64_t rx_size; int64_t ret; };  /* ret: out */
struct hc_net_wait_tx { uint64_t reserved; };

/* The clock page: `generation` changes each time the vCPU starts running again (the guest
 * clock stood still while it was stopped, the TSC did not); mult = 2^32 * 10^6 / tsc_khz,
 * 0 when the TSC frequency is unknown. */
struct abi_clock { uint64_t generation; uint64_t mult; };

/* NIC rings (docs/guest-abi.md): indexes are free-running u32, slot = index % size. */
struct nic_desc { uint64_t addr; uint32_t len; uint32_t reserved; };
struct nic_ctrl {
    volatile uint32_t tx_prod;                              /* guest */
    uint32_t pad0[15];
    volatile uint32_t tx_cons, tx_notify;                   /* host */
    uint32_t pad1[14];
    volatile uint32_t rx_avail, rx_cons;                    /* guest */
    uint32_t pad2[14];
    volatile uint32_t rx_used, rx_notify;                   /* host */
    uint32_t pad3[14];
};
/* The console ring (docs/guest-abi.md): bytes, free-running u32 indexes. */
struct hc_console_setup { uint64_t ctrl; uint64_t data; uint64_t size; int64_t ret; };  /* ret: out */
struct console_ctrl {
    volatile uint32_t prod;                                 /* guest */
    uint32_t pad0[15];
    volatile uint32_t cons;                                 /* host */
    uint32_t pad1[15];
};
struct hc_block { uint64_t sector; uint64_t data; uint64_t count; int64_t ret; };  /* ret: out */
struct hc_halt { uint64_t status; };

static inline void hypercall(uint16_t port, void *arg)
{
    __asm__ volatile("outl %0, %1" : : "a"((uint32_t)(uintptr_t)arg), "Nd"(port) : "memory");
}

#endif
