"""colo-appliance: live migration and COLO fault tolerance for a KVM guest of our own."""
__version__ = "0.1.0"
