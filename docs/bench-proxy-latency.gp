# gnuplot script written by spoke-bench proxy --plot (run from this directory)
set title "Proxy latency against offered load (128 B requests, 64 connections, open loop)"
set xlabel "offered load (requests/s)"
set ylabel "latency (us, log scale): solid p99, dashed p50"
set logscale y
set key below
set grid
set terminal pngcairo size 1000,680
set output "bench-proxy-latency.png"
plot "bench-proxy-latency.dat" index 0 using 1:3 with linespoints lw 2 lc 1 title "direct to echo (no proxy) p99", "bench-proxy-latency.dat" index 0 using 1:2 with linespoints dt 2 lc 1 notitle, \
  "bench-proxy-latency.dat" index 1 using 1:3 with linespoints lw 2 lc 2 title "HAProxy, nbthread 1 p99", "bench-proxy-latency.dat" index 1 using 1:2 with linespoints dt 2 lc 2 notitle, \
  "bench-proxy-latency.dat" index 2 using 1:3 with linespoints lw 2 lc 3 title "spoked, 1 worker, 0 plugins p99", "bench-proxy-latency.dat" index 2 using 1:2 with linespoints dt 2 lc 3 notitle, \
  "bench-proxy-latency.dat" index 3 using 1:3 with linespoints lw 2 lc 4 title "spoked, 1 worker, 1 passthrough p99", "bench-proxy-latency.dat" index 3 using 1:2 with linespoints dt 2 lc 4 notitle, \
  "bench-proxy-latency.dat" index 4 using 1:3 with linespoints lw 2 lc 5 title "spoked, 1 worker, 4 passthrough p99", "bench-proxy-latency.dat" index 4 using 1:2 with linespoints dt 2 lc 5 notitle
set terminal svg size 1000,680 dynamic
set output "bench-proxy-latency.svg"
plot "bench-proxy-latency.dat" index 0 using 1:3 with linespoints lw 2 lc 1 title "direct to echo (no proxy) p99", "bench-proxy-latency.dat" index 0 using 1:2 with linespoints dt 2 lc 1 notitle, \
  "bench-proxy-latency.dat" index 1 using 1:3 with linespoints lw 2 lc 2 title "HAProxy, nbthread 1 p99", "bench-proxy-latency.dat" index 1 using 1:2 with linespoints dt 2 lc 2 notitle, \
  "bench-proxy-latency.dat" index 2 using 1:3 with linespoints lw 2 lc 3 title "spoked, 1 worker, 0 plugins p99", "bench-proxy-latency.dat" index 2 using 1:2 with linespoints dt 2 lc 3 notitle, \
  "bench-proxy-latency.dat" index 3 using 1:3 with linespoints lw 2 lc 4 title "spoked, 1 worker, 1 passthrough p99", "bench-proxy-latency.dat" index 3 using 1:2 with linespoints dt 2 lc 4 notitle, \
  "bench-proxy-latency.dat" index 4 using 1:3 with linespoints lw 2 lc 5 title "spoked, 1 worker, 4 passthrough p99", "bench-proxy-latency.dat" index 4 using 1:2 with linespoints dt 2 lc 5 notitle
