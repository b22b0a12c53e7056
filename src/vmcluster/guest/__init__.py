"""The probe guest: its image (kernel + initramfs), its workload and its on-disk records."""
