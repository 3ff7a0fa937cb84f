package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"reflect"
	"slices"
	"strings"
)

// MaxBodyBytes bounds a request body.
const MaxBodyBytes = 4 << 20

// Decode reads one JSON value from data into v strictly: unknown fields,
// wrong types, trailing data and malformed JSON are refused with a
// FieldErrors whose field paths start at root (for example "spec").
func Decode(data []byte, v any, root string) error {
	if t := bytes.TrimSpace(data); bytes.Equal(t, []byte("null")) {
		return FieldErrors{{Field: root, Reason: "a JSON object is required, not null"}}
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return describe(err, data, v, root)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return FieldErrors{{Field: root, Reason: "unexpected data after the JSON value"}}
	}
	return nil
}

func join(root, path string) string {
	switch {
	case path == "":
		return root
	case root == "":
		return path
	}
	return root + "." + path
}

func describe(err error, data []byte, v any, root string) error {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.Is(err, io.EOF):
		return FieldErrors{{Field: root, Reason: "empty body: a JSON object is required"}}
	case errors.Is(err, io.ErrUnexpectedEOF):
		return FieldErrors{{Field: root, Reason: "malformed JSON: unexpected end of input"}}
	case errors.As(err, &syn):
		return FieldErrors{{Field: root, Reason: fmt.Sprintf("malformed JSON at byte %d: %s", syn.Offset, syn.Error())}}
	case errors.As(err, &typ):
		path := typ.Field
		if p, ok := typePath(data, reflect.TypeOf(v), typ); ok {
			path = p
		}
		field := join(root, path)
		want := typeName(typ.Type)
		return FieldErrors{{Field: field, Reason: fmt.Sprintf("must be %s, not %s", want, typ.Value)}}
	}
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		name = strings.Trim(name, `"`)
		path := unknownPath(data, reflect.TypeOf(v), name)
		return FieldErrors{{Field: join(root, path), Reason: "unknown field"}}
	}
	// Errors from a type's own UnmarshalJSON (quantities, durations) do not
	// carry a path; find the field by decoding leaf by leaf.
	if path, reason, ok := findBadLeaf(data, reflect.TypeOf(v)); ok {
		return FieldErrors{{Field: join(root, path), Reason: reason}}
	}
	return FieldErrors{{Field: root, Reason: err.Error()}}
}

func typeName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Slice, reflect.Array:
		return "a list"
	case reflect.Map, reflect.Struct:
		return "an object"
	case reflect.Pointer:
		return typeName(t.Elem())
	}
	return t.String()
}

// fieldsOf maps JSON names to field types, following embedded structs.
func fieldsOf(t reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("json")
		name, _, _ := strings.Cut(tag, ",")
		if name == "-" {
			continue
		}
		if f.Anonymous && name == "" {
			ft := f.Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct {
				for k, v := range fieldsOf(ft) {
					out[k] = v
				}
				continue
			}
		}
		if name == "" {
			name = f.Name
		}
		out[name] = f.Type
	}
	return out
}

func deref(t reflect.Type) reflect.Type {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t
}

// unknownPath walks the generic decoding of data beside type t to find the
// path of the unknown field called name.
func unknownPath(data []byte, t reflect.Type, name string) string {
	var raw any
	if json.Unmarshal(data, &raw) != nil {
		return name
	}
	if p, ok := walkUnknown(raw, deref(t), "", name); ok {
		return p
	}
	return name
}

func walkUnknown(raw any, t reflect.Type, path, name string) (string, bool) {
	t = deref(t)
	if t.Implements(reflect.TypeFor[json.Unmarshaler]()) || reflect.PointerTo(t).Implements(reflect.TypeFor[json.Unmarshaler]()) {
		return "", false
	}
	switch t.Kind() {
	case reflect.Struct:
		obj, ok := raw.(map[string]any)
		if !ok {
			return "", false
		}
		fields := fieldsOf(t)
		for _, k := range slices.Sorted(maps.Keys(obj)) {
			ft, known := lookupField(fields, k)
			if !known {
				if k == name {
					return join(path, k), true
				}
				continue
			}
			if p, ok := walkUnknown(obj[k], ft, join(path, k), name); ok {
				return p, true
			}
		}
	case reflect.Slice, reflect.Array:
		list, ok := raw.([]any)
		if !ok {
			return "", false
		}
		for i, v := range list {
			if p, ok := walkUnknown(v, t.Elem(), fmt.Sprintf("%s[%d]", path, i), name); ok {
				return p, true
			}
		}
	case reflect.Map:
		obj, ok := raw.(map[string]any)
		if !ok {
			return "", false
		}
		for _, k := range slices.Sorted(maps.Keys(obj)) {
			if p, ok := walkUnknown(obj[k], t.Elem(), join(path, k), name); ok {
				return p, true
			}
		}
	}
	return "", false
}

// lookupField matches a JSON key to a field as encoding/json does: exactly,
// else case-insensitively.
func lookupField(fields map[string]reflect.Type, key string) (reflect.Type, bool) {
	if t, ok := fields[key]; ok {
		return t, true
	}
	for k, t := range fields {
		if strings.EqualFold(k, key) {
			return t, true
		}
	}
	return nil, false
}

// findBadLeaf decodes each leaf value of data into its field's type to find
// the first one that a custom unmarshaler refuses.
func findBadLeaf(data []byte, t reflect.Type) (string, string, bool) {
	var raw any
	if json.Unmarshal(data, &raw) != nil {
		return "", "", false
	}
	return walkLeaf(raw, deref(t), "")
}

func walkLeaf(raw any, t reflect.Type, path string) (string, string, bool) {
	pt := t
	t = deref(t)
	if t.Implements(reflect.TypeFor[json.Unmarshaler]()) || reflect.PointerTo(t).Implements(reflect.TypeFor[json.Unmarshaler]()) {
		b, _ := json.Marshal(raw)
		if err := json.Unmarshal(b, reflect.New(pt).Interface()); err != nil {
			return path, err.Error(), true
		}
		return "", "", false
	}
	switch t.Kind() {
	case reflect.Struct:
		obj, ok := raw.(map[string]any)
		if !ok {
			return "", "", false
		}
		fields := fieldsOf(t)
		for _, k := range slices.Sorted(maps.Keys(obj)) {
			if ft, ok := lookupField(fields, k); ok {
				if p, r, bad := walkLeaf(obj[k], ft, join(path, k)); bad {
					return p, r, true
				}
			}
		}
	case reflect.Slice, reflect.Array:
		if list, ok := raw.([]any); ok {
			for i, v := range list {
				if p, r, bad := walkLeaf(v, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); bad {
					return p, r, true
				}
			}
		}
	case reflect.Map:
		if obj, ok := raw.(map[string]any); ok {
			for _, k := range slices.Sorted(maps.Keys(obj)) {
				if p, r, bad := walkLeaf(obj[k], t.Elem(), join(path, k)); bad {
					return p, r, true
				}
			}
		}
	}
	return "", "", false
}

// typePath finds the value that encoding/json refused with typ: typ.Field
// names struct fields only, without list indices or map keys
// ("ports.port"), so walk data to name the element ("ports[1].port").
func typePath(data []byte, t reflect.Type, typ *json.UnmarshalTypeError) (string, bool) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var raw any
	if dec.Decode(&raw) != nil {
		return "", false
	}
	return walkType(raw, t, "", "", typ)
}

// walkType walks raw beside type t; path is the place in data and fields the
// same place as encoding/json names it.
func walkType(raw any, t reflect.Type, path, fields string, typ *json.UnmarshalTypeError) (string, bool) {
	pt := t
	t = deref(t)
	if !t.Implements(reflect.TypeFor[json.Unmarshaler]()) && !reflect.PointerTo(t).Implements(reflect.TypeFor[json.Unmarshaler]()) {
		switch t.Kind() {
		case reflect.Struct:
			if obj, ok := raw.(map[string]any); ok {
				fs := fieldsOf(t)
				for _, k := range slices.Sorted(maps.Keys(obj)) {
					if ft, ok := lookupField(fs, k); ok {
						// Name the field as encoding/json does: "Replicas" is "replicas".
						n := errorName(t, k)
						name := n[strings.LastIndex(n, ".")+1:]
						if p, ok := walkType(obj[k], ft, join(path, name), join(fields, n), typ); ok {
							return p, true
						}
					}
				}
			}
		case reflect.Slice, reflect.Array:
			if list, ok := raw.([]any); ok {
				for i, v := range list {
					if p, ok := walkType(v, t.Elem(), fmt.Sprintf("%s[%d]", path, i), fields, typ); ok {
						return p, true
					}
				}
			}
		case reflect.Map:
			if obj, ok := raw.(map[string]any); ok {
				for _, k := range slices.Sorted(maps.Keys(obj)) {
					if p, ok := walkType(obj[k], t.Elem(), join(path, k), fields, typ); ok {
						return p, true
					}
				}
			}
		}
	}
	if fields != typ.Field {
		return "", false
	}
	b, err := json.Marshal(raw)
	if err != nil {
		return "", false
	}
	var here *json.UnmarshalTypeError
	err = json.Unmarshal(b, reflect.New(pt).Interface())
	if errors.As(err, &here) && here.Field == "" && here.Type == typ.Type && here.Value == typ.Value {
		return path, true
	}
	return "", false
}

// errorName names the field of struct t that JSON key matches as
// encoding/json does in an UnmarshalTypeError: its JSON name, after the Go
// names of the embedded structs it is promoted from ("NodeRegistration.address").
func errorName(t reflect.Type, key string) string {
	if n, ok := goName(t, key, false); ok {
		return n
	}
	if n, ok := goName(t, key, true); ok {
		return n
	}
	return key
}

func goName(t reflect.Type, key string, fold bool) (string, bool) {
	var embedded []reflect.StructField
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if f.Anonymous && name == "" && deref(f.Type).Kind() == reflect.Struct {
			embedded = append(embedded, f)
			continue
		}
		if name == "" {
			name = f.Name
		}
		if name == key || fold && strings.EqualFold(name, key) {
			return name, true
		}
	}
	// A promoted field is shadowed by a direct one of the same name.
	for _, f := range embedded {
		if n, ok := goName(deref(f.Type), key, fold); ok {
			return f.Name + "." + n, true
		}
	}
	return "", false
}
