package api

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// CPU is an amount of CPU in millicores. On the wire it is a string such as
// "500m" or "2" (cores); a bare JSON number is read as cores.
type CPU int64

// ParseCPU reads "250m", "0.5" or "2" into millicores.
func ParseCPU(s string) (CPU, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, fmt.Errorf("empty CPU quantity")
	}
	if m, ok := strings.CutSuffix(s, "m"); ok {
		v, err := strconv.ParseInt(m, 10, 64)
		// Same bound as cores (1e12), so that String() reads back.
		if err != nil || v < 0 || v > 1e15 {
			return 0, fmt.Errorf("%q is not a CPU quantity (like 250m or 1.5)", s)
		}
		return CPU(v), nil
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 || math.IsInf(f, 0) || math.IsNaN(f) || f > 1e12 {
		return 0, fmt.Errorf("%q is not a CPU quantity (like 250m or 1.5)", s)
	}
	return CPU(math.Round(f * 1000)), nil
}

func (c CPU) String() string {
	if c%1000 == 0 {
		return strconv.FormatInt(int64(c)/1000, 10)
	}
	return strconv.FormatInt(int64(c), 10) + "m"
}

// MarshalJSON writes the quantity as a string.
func (c CPU) MarshalJSON() ([]byte, error) { return json.Marshal(c.String()) }

// UnmarshalJSON accepts a quantity string or a number of cores.
func (c *CPU) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	var s string
	if len(b) > 0 && b[0] != '"' {
		s = string(b)
	} else if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := ParseCPU(s)
	if err != nil {
		return err
	}
	*c = v
	return nil
}

// Bytes is an amount of memory in bytes. On the wire it is a string such as
// "128Mi", "1Gi", "500M" or "1048576"; a bare JSON number is bytes.
type Bytes int64

var byteUnits = []struct {
	suffix string
	mult   int64
}{
	{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40},
	{"k", 1e3}, {"K", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12},
}

// ParseBytes reads "128Mi", "1G" or "4096" into bytes.
func ParseBytes(s string) (Bytes, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, fmt.Errorf("empty memory quantity")
	}
	mult := int64(1)
	num := s
	for _, u := range byteUnits {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			num, mult = n, u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 || math.IsInf(f, 0) || math.IsNaN(f) || f*float64(mult) > float64(math.MaxInt64/2) {
		return 0, fmt.Errorf("%q is not a memory quantity (like 64Mi or 1Gi)", s)
	}
	return Bytes(math.Round(f * float64(mult))), nil
}

func (b Bytes) String() string {
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"Ti", 1 << 40}, {"Gi", 1 << 30}, {"Mi", 1 << 20}, {"Ki", 1 << 10}} {
		if b != 0 && int64(b)%u.mult == 0 {
			return strconv.FormatInt(int64(b)/u.mult, 10) + u.suffix
		}
	}
	return strconv.FormatInt(int64(b), 10)
}

// Human prints the amount rounded for people: "23.3Gi", "512Mi".
func (b Bytes) Human() string {
	v := float64(b)
	for _, u := range []string{"", "Ki", "Mi", "Gi", "Ti"} {
		// 1023.95 and above prints as "1024.0": go on to the next unit.
		if v < 1023.95 || u == "Ti" {
			if v == float64(int64(v)) {
				return fmt.Sprintf("%d%s", int64(v), u)
			}
			return fmt.Sprintf("%.1f%s", v, u)
		}
		v /= 1024
	}
	return b.String()
}

// MarshalJSON writes the quantity as a string.
func (b Bytes) MarshalJSON() ([]byte, error) { return json.Marshal(b.String()) }

// UnmarshalJSON accepts a quantity string or a number of bytes.
func (b *Bytes) UnmarshalJSON(data []byte) error {
	if string(data) == "null" {
		return nil
	}
	var s string
	if len(data) > 0 && data[0] != '"' {
		s = string(data)
	} else if err := json.Unmarshal(data, &s); err != nil {
		return err
	}
	v, err := ParseBytes(s)
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// Duration is a time.Duration written as a Go duration string ("1s", "250ms").
type Duration time.Duration

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

func (d Duration) String() string { return time.Duration(d).String() }

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON accepts a duration string such as "1.5s".
func (d *Duration) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("a duration is a string like \"10s\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration (like 500ms or 10s)", s)
	}
	*d = Duration(v)
	return nil
}
