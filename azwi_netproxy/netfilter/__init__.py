"""Netfilter backends of the init container: nftables (`nft -j -f -`) and legacy iptables
(python-iptables). They apply what `azwi_netproxy.rules` renders and own nothing else."""
