package api

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

var serviceSeeds = []string{
	`{"name":"web","image":"nginx"}`,
	`{
		"name": "web", "image": "nginx:1.27", "command": ["nginx"], "args": ["-g", "daemon off;"],
		"env": {"MODE": "prod"}, "replicas": 3,
		"resources": {"cpu": "250m", "memory": "64Mi", "limits": {"cpu": 1, "memory": 134217728}},
		"networks": ["backend"],
		"ports": [{"name": "http", "port": 80, "hostPort": 8080}, {"name": "dns", "port": 53, "protocol": "udp"}],
		"check": {"http": {"port": 80, "path": "/healthz"}, "interval": "5s", "timeout": "1s", "failuresBeforeCritical": 3},
		"update": {"maxParallel": 2, "maxSurge": 0, "healthDeadline": "1m", "autoRollback": true},
		"restart": {"policy": "on-failure", "maxRestarts": 5, "delay": "500ms", "maxDelay": "30s"},
		"placement": {"strategy": "spread", "constraints": ["zone==a", "gpu"], "maxPerNode": 1},
		"security": {"user": "1000", "readOnlyRootFilesystem": true},
		"meta": {"team": "web"}
	}`,
	`{"name":"w","image":"i","check":{"ttl":"30s"}}`,
	`{"name":"w","image":"i","check":{"exec":{"command":["true"]}},"resources":{"cpu":0.5,"memory":"1.5Gi"}}`,
	`{"Name":"w","IMAGE":"i","replicas":null,"check":null}`,
	``,
	`null`,
	`[]`,
	`{"name":`,
	`{"name":"web"} {}`,
	`{"name":"web","replica":2}`,
	`{"check":{"http":{"port":80,"pat":"/"}}}`,
	`{"ports":[{"name":"http","port":80,"foo":1}]}`,
	`{"ports":[{"name":"http","port":"80"}]}`,
	`{"replicas":"2"}`,
	`{"replicas":-1}`,
	`{"resources":{"cpu":"abc"}}`,
	`{"resources":{"cpu":"9223372036854775000m","memory":"4611686018427387904"}}`,
	`{"restart":{"delay":"-1s","maxDelay":"1ns"}}`,
	`{"restart":{"delay":"-2562047h47m16.854775808s","maxDelay":"2562047h47m16.854775807s"}}`,
	`{"env":{"A":1}}`,
	`{"meta":{"":"\u0000"}}`,
	`{"name":"\xff","image":"\xfe"}`,
}

// checkFieldErrors checks that a Decode error is a non-empty FieldErrors
// whose paths start at root.
func checkFieldErrors(t *testing.T, err error, root string) {
	t.Helper()
	fe, ok := AsFieldErrors(err)
	if !ok || len(fe) == 0 {
		t.Fatalf("Decode error %v (%T) is not field errors", err, err)
	}
	for _, f := range fe {
		if !strings.HasPrefix(f.Field, root) || f.Reason == "" {
			t.Fatalf("bad field error %q (root %q)", f, root)
		}
	}
}

func FuzzDecodeServiceSpec(f *testing.F) {
	for _, s := range serviceSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var s ServiceSpec
		if err := Decode(data, &s, "spec"); err != nil {
			checkFieldErrors(t, err, "spec")
			return
		}
		s.Normalize()
		_ = s.Validate()
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatalf("Marshal(%+v): %v", s, err)
		}
		var back ServiceSpec
		if err := Decode(b, &back, "spec"); err != nil {
			t.Fatalf("Decode(Marshal(spec)) = %v\ninput: %q\nencoded: %s", err, data, b)
		}
		// The encoding is stable, and normalizing again changes nothing.
		back.Normalize()
		b2, err := json.Marshal(back)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, b2) {
			t.Fatalf("encoding changed after a round trip:\n%s\n%s", b, b2)
		}
	})
}

func FuzzDecodeRegistration(f *testing.F) {
	for _, s := range []string{
		`{"address":"192.0.2.10","port":8080}`,
		`{"address":"192.0.2.10","port":8080,"ports":{"admin":9000},"meta":{"v":"1"},"ttl":"1m","health":"warning"}`,
		`{"address":"2001:db8::1","port":1,"ttl":"24h"}`,
		``,
		`{"address":"192.0.2.10","foo":1}`,
		`{"port":"80"}`,
		`{"ports":{"http":"80"}}`,
		`{"ttl":10}`,
		`{"ttl":"forever"}`,
		`{"meta":{"a":{"b":1}}}`,
		`{"address":"10.0.0.1"}]`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var r RegistrationSpec
		if err := Decode(data, &r, ""); err != nil {
			checkFieldErrors(t, err, "")
			return
		}
		r.Normalize()
		_ = r.Validate("web", "web-1")
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatalf("Marshal(%+v): %v", r, err)
		}
		var back RegistrationSpec
		if err := Decode(b, &back, ""); err != nil {
			t.Fatalf("Decode(Marshal(registration)) = %v\ninput: %q\nencoded: %s", err, data, b)
		}
		back.Normalize()
		b2, err := json.Marshal(back)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, b2) {
			t.Fatalf("encoding changed after a round trip:\n%s\n%s", b, b2)
		}
	})
}

func FuzzParseCPU(f *testing.F) {
	for _, s := range []string{
		"250m", "1.5", "2", "0", "0.0005", "1e12", "1000000000000000m", "", "-1", "abc",
		"1.5m", "NaN", "Inf", "9223372036854775000m", "0x1p4", "1_000", " 3 ",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseCPU(s)
		if err != nil {
			return
		}
		if c < 0 {
			t.Fatalf("ParseCPU(%q) = %d < 0", s, c)
		}
		back, err := ParseCPU(c.String())
		if err != nil || back != c {
			t.Fatalf("ParseCPU(%q) = %d; ParseCPU(%q) = %d, %v", s, c, c.String(), back, err)
		}
		b, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		var j CPU
		if err := json.Unmarshal(b, &j); err != nil || j != c {
			t.Fatalf("JSON %s of %d reads back as %d, %v", b, c, j, err)
		}
	})
}

func FuzzParseBytes(f *testing.F) {
	for _, s := range []string{
		"64Mi", "1Gi", "500M", "1048576", "1.5Gi", "0.1Ki", "1e3", "4611686018427387904", "4194304Ti",
		"", "-1", "abc", "1Pi", "1.5m", "NaN", "Inf", "9999999Ti", "0x1p4Ki", " 2k ",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseBytes(s)
		if err != nil {
			return
		}
		if v < 0 {
			t.Fatalf("ParseBytes(%q) = %d < 0", s, v)
		}
		_ = v.Human()
		back, err := ParseBytes(v.String())
		if err != nil || back != v {
			t.Fatalf("ParseBytes(%q) = %d; ParseBytes(%q) = %d, %v", s, v, v.String(), back, err)
		}
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		var j Bytes
		if err := json.Unmarshal(b, &j); err != nil || j != v {
			t.Fatalf("JSON %s of %d reads back as %d, %v", b, v, j, err)
		}
	})
}

func FuzzParseConstraint(f *testing.F) {
	for _, s := range []string{
		"zone==a", " zone == a ", "disk!=hdd", "gpu", "example.com/role==web", "", "zone = a",
		"zone==", "zone==a b", "a!=b==c", "==", "!=", "zone==a\u00a0", "k==\u0085v",
	} {
		f.Add(s)
	}
	labels := map[string]string{"zone": "a", "gpu": ""}
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseConstraint(s)
		if err != nil {
			return
		}
		switch c.Op {
		case "==", "!=", "exists":
		default:
			t.Fatalf("ParseConstraint(%q) op = %q", s, c.Op)
		}
		back, err := ParseConstraint(c.String())
		if err != nil || back != c {
			t.Fatalf("ParseConstraint(%q) = %+v; ParseConstraint(%q) = %+v, %v", s, c, c.String(), back, err)
		}
		_ = c.Match(labels)
		_ = c.Match(nil)
	})
}
