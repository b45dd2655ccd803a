"""End-to-end tests through a real QEMU guest and a real libvirtd."""
