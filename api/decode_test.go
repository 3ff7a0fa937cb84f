package api

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestDecodeServiceSpecErrors(t *testing.T) {
	tests := []struct {
		name   string
		in     string
		field  string
		reason string // exact, or a prefix when it ends in "…"
	}{
		// Malformed input.
		{"empty body", ``, "spec", "empty body: a JSON object is required"},
		{"blank body", " \n\t", "spec", "empty body: a JSON object is required"},
		{"truncated", `{"name":`, "spec", "malformed JSON: unexpected end of input"},
		{"truncated object", `{"name":"web"`, "spec", "malformed JSON: unexpected end of input"},
		{"missing colon", `{"name" "web"}`, "spec", `malformed JSON at byte 9: invalid character '"' after object key`},
		{"trailing comma", `{"name":"web",}`, "spec", "malformed JSON at byte 15: invalid character '}' looking for beginning of object key string"},
		{"not JSON", `name: web`, "spec", "malformed JSON at byte 2: invalid character 'a' in literal null (expecting 'u')"},
		{"trailing object", `{"name":"web"} {}`, "spec", "unexpected data after the JSON value"},
		{"trailing garbage", `{"name":"web"}x`, "spec", "unexpected data after the JSON value"},
		{"trailing brace", `{"name":"web"}}`, "spec", "unexpected data after the JSON value"},

		// Unknown fields, wherever they are.
		{"unknown top-level field", `{"name":"web","replica":2}`, "spec.replica", "unknown field"},
		{"unknown nested field", `{"check":{"http":{"port":80,"pat":"/"}}}`, "spec.check.http.pat", "unknown field"},
		{"unknown field in a list element", `{"ports":[{"name":"http","port":80,"foo":1}]}`, "spec.ports[0].foo", "unknown field"},
		{"unknown field in the second element", `{"ports":[{"name":"http","port":80},{"name":"b","port":81,"foo":1}]}`, "spec.ports[1].foo", "unknown field"},
		{"field known elsewhere", `{"check":{"http":{"path":"/"}},"ports":[{"name":"a","port":1,"path":"/"}]}`, "spec.ports[0].path", "unknown field"},
		{"unknown field under a pointer", `{"resources":{"limits":{"gpu":1}}}`, "spec.resources.limits.gpu", "unknown field"},
		{"unknown field in update", `{"update":{"maxUnavailable":1}}`, "spec.update.maxUnavailable", "unknown field"},

		// Wrong JSON types.
		{"replicas as a string", `{"replicas":"2"}`, "spec.replicas", "must be an integer, not string"},
		{"replicas as a string, folded key", `{"Replicas":"2"}`, "spec.replicas", "must be an integer, not string"},
		{"port as a string, folded keys", `{"Ports":[{"name":"http","PORT":"80"}]}`, "spec.ports[0].port", "must be an integer, not string"},
		{"replicas as a fraction", `{"replicas":1.5}`, "spec.replicas", "must be an integer, not number 1.5"},
		{"replicas too large", `{"replicas":1e100}`, "spec.replicas", "must be an integer, not number 1e100"},
		{"name as a number", `{"name":1}`, "spec.name", "must be a string, not number"},
		{"command as a string", `{"command":"ls -l"}`, "spec.command", "must be a list, not string"},
		{"env as a list", `{"env":["A=1"]}`, "spec.env", "must be an object, not array"},
		{"env value as a number", `{"env":{"A":"x","B":1}}`, "spec.env.B", "must be a string, not number"},
		{"check as a string", `{"check":"http"}`, "spec.check", "must be an object, not string"},
		{"bool as a string", `{"update":{"autoRollback":"yes"}}`, "spec.update.autoRollback", "must be true or false, not string"},
		{"network as a number", `{"networks":["a",2]}`, "spec.networks[1]", "must be a string, not number"},
		{"port as a string", `{"ports":[{"name":"http","port":80},{"name":"b","port":"81"}]}`, "spec.ports[1].port", "must be an integer, not string"},
		{"nested port as a string", `{"check":{"http":{"port":"80"}}}`, "spec.check.http.port", "must be an integer, not string"},
		{"exec command element", `{"check":{"exec":{"command":["true",false]}}}`, "spec.check.exec.command[1]", "must be a string, not bool"},
		{"top-level list", `[]`, "spec", "must be an object, not array"},
		{"top-level string", `"web"`, "spec", "must be an object, not string"},

		// Errors of the types' own unmarshalers.
		{"cpu", `{"resources":{"cpu":"abc"}}`, "spec.resources.cpu", `"abc" is not a CPU quantity (like 250m or 1.5)`},
		{"cpu negative number", `{"resources":{"cpu":-1}}`, "spec.resources.cpu", `"-1" is not a CPU quantity (like 250m or 1.5)`},
		{"memory", `{"resources":{"memory":"1Pi"}}`, "spec.resources.memory", `"1Pi" is not a memory quantity (like 64Mi or 1Gi)`},
		{"limit memory", `{"resources":{"memory":"64Mi","limits":{"memory":"lots"}}}`, "spec.resources.limits.memory", `"lots" is not a memory quantity (like 64Mi or 1Gi)`},
		{"duration as a number", `{"check":{"ttl":"10s","interval":10}}`, "spec.check.interval", `a duration is a string like "10s"`},
		{"duration", `{"restart":{"delay":"1 s"}}`, "spec.restart.delay", `"1 s" is not a duration (like 500ms or 10s)`},
		{"duration without unit", `{"update":{"healthDeadline":"30"}}`, "spec.update.healthDeadline", `"30" is not a duration (like 500ms or 10s)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var s ServiceSpec
			err := Decode([]byte(tt.in), &s, "spec")
			var fe FieldErrors
			if !errors.As(err, &fe) {
				t.Fatalf("Decode(%s) = %v (%T), want FieldErrors", tt.in, err, err)
			}
			if len(fe) != 1 {
				t.Fatalf("Decode(%s) = %q, want one error", tt.in, fe)
			}
			if fe[0].Field != tt.field {
				t.Errorf("Decode(%s) field = %q, want %q (reason %q)", tt.in, fe[0].Field, tt.field, fe[0].Reason)
			}
			if prefix, ok := strings.CutSuffix(tt.reason, "…"); ok {
				if !strings.HasPrefix(fe[0].Reason, prefix) {
					t.Errorf("Decode(%s) reason = %q, want %q…", tt.in, fe[0].Reason, prefix)
				}
			} else if fe[0].Reason != tt.reason {
				t.Errorf("Decode(%s) reason = %q, want %q", tt.in, fe[0].Reason, tt.reason)
			}
		})
	}
}

func TestDecodeServiceSpec(t *testing.T) {
	in := `{
		"name": "web",
		"image": "nginx:1.27",
		"command": ["nginx"],
		"args": ["-g", "daemon off;"],
		"env": {"MODE": "prod"},
		"replicas": 3,
		"resources": {"cpu": "250m", "memory": "64Mi", "limits": {"cpu": 1, "memory": 134217728}},
		"networks": ["backend"],
		"ports": [{"name": "http", "port": 80, "hostPort": 8080}, {"name": "dns", "port": 53, "protocol": "udp"}],
		"check": {"http": {"port": 80, "path": "/healthz"}, "interval": "5s", "timeout": "1s", "failuresBeforeCritical": 3},
		"update": {"maxParallel": 2, "maxSurge": 0, "healthDeadline": "1m", "autoRollback": true},
		"restart": {"policy": "on-failure", "maxRestarts": 5, "delay": "500ms", "maxDelay": "30s"},
		"placement": {"strategy": "spread", "constraints": ["zone==a"], "maxPerNode": 1},
		"security": {"user": "1000", "readOnlyRootFilesystem": true},
		"meta": {"team": "web"}
	}` + "\n"
	want := ServiceSpec{
		Name:      "web",
		Image:     "nginx:1.27",
		Command:   []string{"nginx"},
		Args:      []string{"-g", "daemon off;"},
		Env:       map[string]string{"MODE": "prod"},
		Replicas:  ptr(3),
		Resources: ResourceSpec{CPU: 250, Memory: 64 << 20, Limits: &Limit{CPU: 1000, Memory: 128 << 20}},
		Networks:  []string{"backend"},
		Ports:     []PortSpec{{Name: "http", Port: 80, HostPort: 8080}, {Name: "dns", Port: 53, Protocol: "udp"}},
		Check: &CheckSpec{
			HTTP:     &HTTPCheck{Port: 80, Path: "/healthz"},
			Interval: Duration(5 * time.Second), Timeout: Duration(time.Second),
			FailuresBeforeCritical: 3,
		},
		Update:    UpdatePolicy{MaxParallel: 2, MaxSurge: ptr(0), HealthDeadline: Duration(time.Minute), AutoRollback: true},
		Restart:   RestartPolicy{Policy: RestartOnFailure, MaxRestarts: 5, Delay: Duration(500 * time.Millisecond), MaxDelay: Duration(30 * time.Second)},
		Placement: Placement{Strategy: StrategySpread, Constraints: []string{"zone==a"}, MaxPerNode: 1},
		Security:  SecuritySpec{User: "1000", ReadOnlyRootFilesystem: true},
		Meta:      map[string]string{"team": "web"},
	}
	var got ServiceSpec
	if err := Decode([]byte(in), &got, "spec"); err != nil {
		t.Fatalf("Decode: %v", err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Decode =\n%+v\nwant\n%+v", got, want)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}

	// Like encoding/json, field names match case-insensitively; nulls leave
	// pointer fields unset.
	var s ServiceSpec
	if err := Decode([]byte(`{"Name":"web","IMAGE":"nginx","replicas":null,"check":null}`), &s, "spec"); err != nil {
		t.Fatalf("Decode: %v", err)
	}
	if s.Name != "web" || s.Image != "nginx" || s.Replicas != nil || s.Check != nil {
		t.Errorf("Decode = %+v", s)
	}
}

func TestDecodeRootlessErrors(t *testing.T) {
	tests := []struct {
		name   string
		v      any
		root   string
		in     string
		field  string
		reason string
	}{
		{"registration empty", &RegistrationSpec{}, "", ``, "", "empty body: a JSON object is required"},
		{"registration unknown field", &RegistrationSpec{}, "", `{"address":"10.0.0.1","foo":1}`, "foo", "unknown field"},
		{"registration port", &RegistrationSpec{}, "", `{"port":"80"}`, "port", "must be an integer, not string"},
		{"registration named port", &RegistrationSpec{}, "", `{"ports":{"admin":1,"http":"80"}}`, "ports.http", "must be an integer, not string"},
		{"registration ttl", &RegistrationSpec{}, "", `{"ttl":"forever"}`, "ttl", `"forever" is not a duration (like 500ms or 10s)`},
		{"registration meta", &RegistrationSpec{}, "", `{"meta":{"a":{"b":1}}}`, "meta.a", "must be a string, not object"},
		{"node capacity unknown field", &NodeRegistration{}, "", `{"capacity":{"cpu":"4","gpu":1}}`, "capacity.gpu", "unknown field"},
		{"node allocatable cpu", &NodeRegistration{}, "", `{"allocatable":{"cpu":"lots"}}`, "allocatable.cpu", `"lots" is not a CPU quantity (like 250m or 1.5)`},
		{"node embedded field", &Node{}, "", `{"name":"n","address":5}`, "address", "must be a string, not number"},
		{"node embedded unknown", &Node{}, "", `{"name":"n","status":{"state":"ready","bogus":1}}`, "status.bogus", "unknown field"},
		{"network unknown field", &NetworkSpec{}, "", `{"name":"n","subnet":"10.0.0.0/24","vni":5}`, "vni", "unknown field"},
		{"instance status vnic", &InstanceStatus{}, "status", `{"state":"running","vnics":[{"ip":"10.0.0.2"},{"ip":10}]}`, "status.vnics[1].ip", "must be a string, not number"},
		{"instance status exit code", &InstanceStatus{}, "status", `{"state":"exited","exitCode":"1"}`, "status.exitCode", "must be an integer, not string"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Decode([]byte(tt.in), tt.v, tt.root)
			fe, ok := AsFieldErrors(err)
			if !ok || len(fe) != 1 {
				t.Fatalf("Decode(%s) = %v, want one field error", tt.in, err)
			}
			if fe[0].Field != tt.field || fe[0].Reason != tt.reason {
				t.Errorf("Decode(%s) = %q, want %q", tt.in, fe[0], FieldError{Field: tt.field, Reason: tt.reason})
			}
		})
	}

	// A time the time package refuses is still named by its field.
	var st InstanceStatus
	err := Decode([]byte(`{"state":"running","startedAt":"yesterday"}`), &st, "status")
	if fe, ok := AsFieldErrors(err); !ok || len(fe) != 1 || fe[0].Field != "status.startedAt" {
		t.Errorf("Decode(startedAt) = %v, want an error on status.startedAt", err)
	}
}

func TestDecodeRegistration(t *testing.T) {
	var r RegistrationSpec
	in := `{"address":"192.0.2.10","port":8080,"ports":{"admin":9000},"meta":{"v":"1"},"ttl":"1m","health":"warning"}`
	if err := Decode([]byte(in), &r, ""); err != nil {
		t.Fatal(err)
	}
	want := RegistrationSpec{
		Address: "192.0.2.10", Port: 8080, Ports: map[string]int{"admin": 9000},
		Meta: map[string]string{"v": "1"}, TTL: Duration(time.Minute), Health: HealthWarning,
	}
	if !reflect.DeepEqual(r, want) {
		t.Errorf("Decode = %+v, want %+v", r, want)
	}
}

func TestFieldErrors(t *testing.T) {
	fe := FieldErrors{{Field: "spec.a", Reason: "bad"}, {Field: "spec.b", Reason: "worse"}}
	if got := fe.Error(); got != "spec.a: bad; spec.b: worse" {
		t.Errorf("Error() = %q", got)
	}
	if got, ok := AsFieldErrors(fe); !ok || !reflect.DeepEqual(got, fe) {
		t.Errorf("AsFieldErrors(FieldErrors) = %v, %v", got, ok)
	}
	one := FieldError{Field: "x", Reason: "y"}
	if got, ok := AsFieldErrors(one); !ok || !reflect.DeepEqual(got, FieldErrors{one}) {
		t.Errorf("AsFieldErrors(FieldError) = %v, %v", got, ok)
	}
	if _, ok := AsFieldErrors(errors.New("plain")); ok {
		t.Error("AsFieldErrors(plain error) = true")
	}
	if _, ok := AsFieldErrors(nil); ok {
		t.Error("AsFieldErrors(nil) = true")
	}
}

func TestDecodeNulls(t *testing.T) {
	var s ServiceSpec
	err := Decode([]byte(" null "), &s, "spec")
	if fe, ok := AsFieldErrors(err); !ok || len(fe) != 1 || fe[0].Field != "spec" || !strings.Contains(fe[0].Reason, "not null") {
		t.Fatalf("null body: %v", err)
	}
	// null for a quantity or duration means "not set", as for plain fields.
	if err := Decode([]byte(`{"name":"a","image":"b","resources":{"cpu":null,"memory":null},"update":{"healthDeadline":null}}`), &s, "spec"); err != nil {
		t.Fatalf("nulls in fields: %v", err)
	}
}

func TestNormalizeDefaultsNeverContradictTheUser(t *testing.T) {
	s := ServiceSpec{Name: "a", Image: "b",
		Restart: RestartPolicy{Delay: Duration(2 * time.Minute)},
		Check:   &CheckSpec{TCP: &TCPCheck{Port: 80}, Timeout: Duration(30 * time.Second)}}
	s.Normalize()
	if err := s.Validate(); err != nil {
		t.Fatalf("defaults made a valid spec invalid: %v", err)
	}
	s2 := ServiceSpec{Name: "a", Image: "b", Check: &CheckSpec{TCP: &TCPCheck{Port: 80}, Interval: Duration(time.Second)}}
	s2.Normalize()
	if s2.Check.Timeout.D() != time.Second || s2.Validate() != nil {
		t.Fatalf("timeout default with a 1s interval: %v %v", s2.Check.Timeout, s2.Validate())
	}
}
