package api

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestParseCPU(t *testing.T) {
	tests := []struct {
		in   string
		want CPU
	}{
		{"250m", 250},
		{"1.5", 1500},
		{"2", 2000},
		{"0", 0},
		{"0m", 0},
		{"0.5", 500},
		{"100m", 100},
		{" 2 ", 2000},
		{"1000m", 1000},
		{"0.0005", 1}, // rounds to the nearest millicore
		{"0.0004", 0},
		{"1e12", 1e15},
		{"1000000000000000m", 1e15},
	}
	for _, tt := range tests {
		got, err := ParseCPU(tt.in)
		if err != nil {
			t.Errorf("ParseCPU(%q): %v", tt.in, err)
			continue
		}
		if got != tt.want {
			t.Errorf("ParseCPU(%q) = %d, want %d", tt.in, got, tt.want)
		}
	}
}

func TestParseCPUInvalid(t *testing.T) {
	for _, in := range []string{
		"", "  ", "-1", "-250m", "abc", "1.5m", "NaN", "Inf", "+Inf", "-Inf",
		"m", "1 m", "1c", "2 cores", "1e13", "1000000000001000m",
		"9223372036854775000m", "99999999999999999999m",
	} {
		if got, err := ParseCPU(in); err == nil {
			t.Errorf("ParseCPU(%q) = %d, want an error", in, got)
		}
	}
	_, err := ParseCPU("abc")
	if err == nil || err.Error() != `"abc" is not a CPU quantity (like 250m or 1.5)` {
		t.Errorf("ParseCPU(abc) error = %v", err)
	}
	if _, err := ParseCPU(""); err == nil || err.Error() != "empty CPU quantity" {
		t.Errorf("ParseCPU(\"\") error = %v", err)
	}
}

func TestCPUString(t *testing.T) {
	tests := []struct {
		in   CPU
		want string
	}{
		{0, "0"},
		{1, "1m"},
		{250, "250m"},
		{1000, "1"},
		{1500, "1500m"},
		{2000, "2"},
		{1e15, "1000000000000"},
	}
	for _, tt := range tests {
		if got := tt.in.String(); got != tt.want {
			t.Errorf("CPU(%d).String() = %q, want %q", tt.in, got, tt.want)
		}
		back, err := ParseCPU(tt.want)
		if err != nil || back != tt.in {
			t.Errorf("ParseCPU(%q) = %d, %v; want %d", tt.want, back, err, tt.in)
		}
	}
}

func TestParseBytes(t *testing.T) {
	tests := []struct {
		in   string
		want Bytes
	}{
		{"64Mi", 64 << 20},
		{"1Gi", 1 << 30},
		{"500M", 500e6},
		{"1048576", 1 << 20},
		{"1.5Gi", 3 << 29},
		{"0", 0},
		{"1Ki", 1024},
		{"2Ti", 2 << 40},
		{"1k", 1000},
		{"1K", 1000},
		{"3G", 3e9},
		{"1T", 1e12},
		{" 128Mi ", 128 << 20},
		{"0.1Ki", 102}, // rounds to the nearest byte
		{"1e3", 1000},
	}
	for _, tt := range tests {
		got, err := ParseBytes(tt.in)
		if err != nil {
			t.Errorf("ParseBytes(%q): %v", tt.in, err)
			continue
		}
		if got != tt.want {
			t.Errorf("ParseBytes(%q) = %d, want %d", tt.in, got, tt.want)
		}
	}
}

func TestParseBytesInvalid(t *testing.T) {
	for _, in := range []string{
		"", " ", "-1", "-1Mi", "abc", "Mi", "1.5m", "1mi", "1Pi", "1P", "NaN",
		"Inf", "Infinity", "1 Mi", "64MiB", "1e30", "9999999Ti",
	} {
		if got, err := ParseBytes(in); err == nil {
			t.Errorf("ParseBytes(%q) = %d, want an error", in, got)
		}
	}
	_, err := ParseBytes("abc")
	if err == nil || err.Error() != `"abc" is not a memory quantity (like 64Mi or 1Gi)` {
		t.Errorf("ParseBytes(abc) error = %v", err)
	}
	if _, err := ParseBytes(""); err == nil || err.Error() != "empty memory quantity" {
		t.Errorf("ParseBytes(\"\") error = %v", err)
	}
}

func TestBytesString(t *testing.T) {
	tests := []struct {
		in   Bytes
		want string
	}{
		{0, "0"},
		{1, "1"},
		{1000, "1000"},
		{1024, "1Ki"},
		{1536, "1536"},
		{64 << 20, "64Mi"},
		{3 << 29, "1536Mi"},
		{1 << 30, "1Gi"},
		{5 << 40, "5Ti"},
		{1 << 50, "1024Ti"},
		{500e6, "500000000"},
	}
	for _, tt := range tests {
		if got := tt.in.String(); got != tt.want {
			t.Errorf("Bytes(%d).String() = %q, want %q", tt.in, got, tt.want)
		}
		back, err := ParseBytes(tt.want)
		if err != nil || back != tt.in {
			t.Errorf("ParseBytes(%q) = %d, %v; want %d", tt.want, back, err, tt.in)
		}
	}
}

func TestBytesHuman(t *testing.T) {
	tests := []struct {
		in   Bytes
		want string
	}{
		{0, "0"},
		{1, "1"},
		{1023, "1023"},
		{1024, "1Ki"},
		{1536, "1.5Ki"},
		{512 << 20, "512Mi"},
		{1 << 30, "1Gi"},
		{25000000000, "23.3Gi"},
		{5 << 40, "5Ti"},
		{1 << 50, "1024Ti"},
		// Just under a unit: rounds up into the next unit, not "1024.0Ki".
		{1<<20 - 1, "1.0Mi"},
		{1<<30 - 1, "1.0Gi"},
		{1<<20 - 60, "1023.9Ki"},
	}
	for _, tt := range tests {
		if got := tt.in.Human(); got != tt.want {
			t.Errorf("Bytes(%d).Human() = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestQuantityJSON(t *testing.T) {
	r := Resources{CPU: 1500, Memory: 64 << 20}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(b), `{"cpu":"1500m","memory":"64Mi"}`; got != want {
		t.Errorf("Marshal = %s, want %s", got, want)
	}
	var back Resources
	if err := json.Unmarshal(b, &back); err != nil || back != r {
		t.Errorf("Unmarshal(%s) = %+v, %v; want %+v", b, back, err, r)
	}

	tests := []struct {
		in   string
		want Resources
	}{
		{`{"cpu":"250m","memory":"1Gi"}`, Resources{CPU: 250, Memory: 1 << 30}},
		{`{"cpu":"2","memory":"500M"}`, Resources{CPU: 2000, Memory: 500e6}},
		{`{"cpu":2,"memory":1048576}`, Resources{CPU: 2000, Memory: 1 << 20}}, // bare numbers: cores, bytes
		{`{"cpu":0.5,"memory":0}`, Resources{CPU: 500}},
		{`{"cpu":"0","memory":"0"}`, Resources{}},
	}
	for _, tt := range tests {
		var got Resources
		if err := json.Unmarshal([]byte(tt.in), &got); err != nil {
			t.Errorf("Unmarshal(%s): %v", tt.in, err)
			continue
		}
		if got != tt.want {
			t.Errorf("Unmarshal(%s) = %+v, want %+v", tt.in, got, tt.want)
		}
	}

	for _, in := range []string{
		`{"cpu":"abc"}`, `{"cpu":-1}`, `{"cpu":"1.5m"}`, `{"cpu":true}`, `{"cpu":{}}`, `{"cpu":[1]}`,
		`{"memory":"abc"}`, `{"memory":-1}`, `{"memory":"1Pi"}`, `{"memory":false}`, `{"memory":{}}`,
	} {
		var got Resources
		if err := json.Unmarshal([]byte(in), &got); err == nil {
			t.Errorf("Unmarshal(%s) = %+v, want an error", in, got)
		}
	}
}

func TestDurationJSON(t *testing.T) {
	var d Duration
	if err := json.Unmarshal([]byte(`"1s"`), &d); err != nil || d != Duration(time.Second) {
		t.Errorf(`Unmarshal("1s") = %v, %v`, d, err)
	}
	if err := json.Unmarshal([]byte(`"1m30s"`), &d); err != nil || d.D() != 90*time.Second {
		t.Errorf(`Unmarshal("1m30s") = %v, %v`, d, err)
	}
	b, err := json.Marshal(Duration(1500 * time.Millisecond))
	if err != nil || string(b) != `"1.5s"` {
		t.Errorf("Marshal(1.5s) = %s, %v", b, err)
	}
	if s := Duration(250 * time.Millisecond).String(); s != "250ms" {
		t.Errorf("String() = %q", s)
	}

	tests := []struct {
		in, err string
	}{
		{`"abc"`, `"abc" is not a duration (like 500ms or 10s)`},
		{`""`, `"" is not a duration (like 500ms or 10s)`},
		{`"10"`, `"10" is not a duration (like 500ms or 10s)`},
		{`10`, `a duration is a string like "10s"`},
		{`1.5`, `a duration is a string like "10s"`},
		{`true`, `a duration is a string like "10s"`},
		{`{}`, `a duration is a string like "10s"`},
	}
	for _, tt := range tests {
		var d Duration
		err := json.Unmarshal([]byte(tt.in), &d)
		if err == nil || !strings.Contains(err.Error(), tt.err) {
			t.Errorf("Unmarshal(%s) error = %v, want %q", tt.in, err, tt.err)
		}
	}

	// In a struct: omitempty leaves out a zero duration.
	b, err = json.Marshal(RestartPolicy{Policy: RestartNever, Delay: Duration(2 * time.Second)})
	if err != nil || string(b) != `{"policy":"never","delay":"2s"}` {
		t.Errorf("Marshal(RestartPolicy) = %s, %v", b, err)
	}
}
