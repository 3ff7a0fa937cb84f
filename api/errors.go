package api

import (
	"errors"
	"fmt"
	"strings"
)

// Error codes carried by Error.
const (
	CodeInvalid  = "invalid"
	CodeNotFound = "not_found"
	CodeConflict = "conflict"
	CodeGone     = "gone"
	CodeInternal = "internal"
	CodeAuth     = "unauthorized"
)

// Error is the body of every API error response.
type Error struct {
	Status  int          `json:"status"`
	Code    string       `json:"code"`
	Message string       `json:"message"`
	Fields  []FieldError `json:"fields,omitempty"`
}

func (e *Error) Error() string { return e.Message }

// FieldError names one field of the input and what is wrong with it.
type FieldError struct {
	Field  string `json:"field"`
	Reason string `json:"reason"`
}

func (f FieldError) Error() string { return f.Field + ": " + f.Reason }

// FieldErrors is a list of problems found in one input.
type FieldErrors []FieldError

func (fe FieldErrors) Error() string {
	parts := make([]string, len(fe))
	for i, f := range fe {
		parts[i] = f.Error()
	}
	return strings.Join(parts, "; ")
}

// AsFieldErrors extracts field errors from err, if it carries any.
func AsFieldErrors(err error) (FieldErrors, bool) {
	var fe FieldErrors
	if errors.As(err, &fe) {
		return fe, true
	}
	var one FieldError
	if errors.As(err, &one) {
		return FieldErrors{one}, true
	}
	return nil, false
}

// errs collects field errors during validation.
type errs struct{ list FieldErrors }

func (e *errs) add(field, format string, args ...any) {
	e.list = append(e.list, FieldError{Field: field, Reason: fmt.Sprintf(format, args...)})
}

func (e *errs) err() error {
	if len(e.list) == 0 {
		return nil
	}
	return e.list
}
