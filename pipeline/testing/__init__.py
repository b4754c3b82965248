"""Worlds to test and benchmark against, never used by the stages: the offline ImageNet sample
(make_sample), a mirror with per-URL faults (serve_sample), thousands of hosts with the real
web's host-level faults (serve_web) and a DNS server with slow and dead names (fake_dns; needs
the dev extra's dnslib). Each server binds loopback only and stops itself after --max-seconds.
"""
