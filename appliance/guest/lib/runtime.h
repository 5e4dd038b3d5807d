/* Internals shared by the runtime's own files (not for guest programs). */
#ifndef GUEST_RUNTIME_H
#define GUEST_RUNTIME_H

#include <stdint.h>
#include "abi.h"

extern const struct abi_boot_info *boot_info;

void heap_init(uint64_t start, uint64_t end);
/* Sets up the NIC rings when the VM has a NIC (platform.c). */
void net_rings_init(void);
/* The NIC rings and their doorbell, for the probe guest's malformed-ring tests. */
extern struct nic_ctrl *nic_ctrl;
extern struct nic_desc *nic_tx_ring, *nic_rx_ring;
void doorbell(void);
/* Sets up the console ring; until then (or if the VMM refuses) the console is a hypercall. */
void console_ring_init(void);
/* The console ring and its doorbell, for the probe guest's tests. */
extern struct console_ctrl *console_ctrl;
void console_doorbell(void);

#endif
