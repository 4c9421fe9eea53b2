// Command probe is the in-cluster client of the local cluster's toolbox image: the end-to-end
// tests run it in pods to resolve Service names (CoreDNS) and call the OpenAI API through
// Services, as another workload in the cluster would. Standard library only (pure-Go resolver,
// static binary), so it builds offline and needs nothing from the image.
//
//	probe lookup HOST                 prints one "Address: IP" line per address of HOST
//	probe http [-d BODY] [-t SECS] URL
//	                                  GET (POST with -d, as JSON) URL; prints the status line
//	                                  and the body; exits 1 unless the status is 2xx
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "lookup":
		lookup(os.Args[2:])
	case "http":
		httpCall(os.Args[2:])
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: probe lookup HOST | probe http [-d BODY] [-t SECS] URL")
	os.Exit(2)
}

func lookup(args []string) {
	if len(args) != 1 {
		usage()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupHost(ctx, args[0])
	if err != nil {
		fmt.Fprintf(os.Stderr, "lookup %s: %v\n", args[0], err)
		os.Exit(1)
	}
	fmt.Printf("Name: %s\n", args[0])
	for _, a := range addrs {
		fmt.Printf("Address: %s\n", a)
	}
}

func httpCall(args []string) {
	fs := flag.NewFlagSet("http", flag.ExitOnError)
	body := fs.String("d", "", "JSON body (makes the request a POST)")
	secs := fs.Int("t", 60, "timeout in seconds")
	_ = fs.Parse(args)
	if fs.NArg() != 1 {
		usage()
	}
	method, reader := http.MethodGet, io.Reader(nil)
	if *body != "" {
		method, reader = http.MethodPost, strings.NewReader(*body)
	}
	req, err := http.NewRequest(method, fs.Arg(0), reader)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if *body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	client := &http.Client{Timeout: time.Duration(*secs) * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	fmt.Printf("HTTP %s\n", resp.Status)
	if _, err := io.Copy(os.Stdout, resp.Body); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println()
	if resp.StatusCode/100 != 2 {
		os.Exit(1)
	}
}
