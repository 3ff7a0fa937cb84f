// Command client calls a berth service through the Go client's Discoverer,
// round robin over its healthy instances, and prints who answered:
//
//	go run ./examples/client [SERVICE]   # default web, at its port named http
package main

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"os"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
)

func main() {
	service := "web"
	if len(os.Args) > 1 {
		service = os.Args[1]
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := client.New(os.Getenv("BERTH_ADDR")) // "" is 127.0.0.1:7480
	if err != nil {
		log.Fatal(err)
	}
	d, err := c.NewDiscoverer(ctx, service, client.DiscovererOptions{Balancer: client.RoundRobin, Port: "http"})
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close()
	for i := 1; i <= 6; i++ {
		err := d.Do(ctx, func(ctx context.Context, ep api.Endpoint) error {
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+d.Addr(ep)+"/", nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return err // Do retries the call once on another instance
			}
			resp.Body.Close()
			fmt.Printf("call %d: %s at %s answered %s\n", i, ep.ID, d.Addr(ep), resp.Status)
			return nil
		})
		if err != nil {
			log.Fatalf("call %d: %v", i, err)
		}
	}
}
