systemd() { die "systemd guest: not built yet"; }
systemd_root() { :; }
